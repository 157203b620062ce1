"""UI text in English and Chinese. Static labels go through Gradio's I18n (browser language);
messages composed at run time use `t(key, lang)` with the language the user picked."""

from __future__ import annotations

import gradio as gr

LANGUAGES = {"en": "English", "zh": "中文"}

STRINGS: dict[str, dict[str, str]] = {
    "title": {"en": "## Small LLM Lab: chat with small open models on your own GPU",
              "zh": "## 小模型实验室：在你自己的显卡上与小型开源大模型对话"},
    "language": {"en": "Language", "zh": "语言"},
    "tab_chat": {"en": "Chat", "zh": "对话"},
    "chatbot": {"en": "Chat", "zh": "对话"},
    "message": {"en": "Message", "zh": "消息"},
    "message_placeholder": {"en": "Type a message and press Enter", "zh": "输入消息后按回车"},
    "send": {"en": "Send", "zh": "发送"},
    "stop": {"en": "Stop", "zh": "停止"},
    "regenerate": {"en": "Regenerate", "zh": "重新生成"},
    "undo": {"en": "Undo last turn", "zh": "撤销上一轮"},
    "clear": {"en": "Clear", "zh": "清空"},
    "settings": {"en": "Generation settings", "zh": "生成设置"},
    "system_prompt": {"en": "System prompt (empty: the model's default)", "zh": "系统提示词（留空则用模型默认）"},
    "temperature": {"en": "Temperature (0 = greedy)", "zh": "温度（0 = 贪心解码）"},
    "top_p": {"en": "Top-p", "zh": "Top-p"},
    "max_new_tokens": {"en": "Max new tokens", "zh": "最多生成 token 数"},
    "model": {"en": "Model: pick one, or type a folder, a .gguf file or a hub id",
              "zh": "模型：从列表选择，或输入文件夹、.gguf 文件或 hub id"},
    "quant": {"en": "Quantization", "zh": "量化方式"},
    "double_quant": {"en": "4-bit double quantization (saves ~0.4 bit per weight)",
                     "zh": "4 位双重量化（每个权重约省 0.4 位）"},
    "gpu_budget": {"en": "GPU budget (GiB)", "zh": "显存预算（GiB）"},
    "context": {"en": "Context length to plan for (tokens)", "zh": "规划的上下文长度（token）"},
    "load": {"en": "Load / reload", "zh": "加载 / 重新加载"},
    "kv_precision": {"en": "KV cache precision", "zh": "KV 缓存精度"},
    "kv_full": {"en": "full (model dtype)", "zh": "完整精度（模型精度）"},
    "kv_fp8": {"en": "fp8 (half the memory of fp16)", "zh": "fp8（显存为 fp16 的一半）"},
    "kv_offload": {"en": "offloaded to CPU RAM (GPU only)", "zh": "卸载到内存（仅 GPU）"},
    "overflow_policy": {"en": "When the chat outgrows the context", "zh": "对话超出上下文时"},
    "policy_drop_oldest": {"en": "drop the oldest turns (keep the system prompt)", "zh": "丢弃最早的轮次（保留系统提示词）"},
    "policy_refuse": {"en": "refuse and tell me", "zh": "拒绝并提示我"},
    "trust_remote_code_warning": {
        "en": "⚠️ trust_remote_code is ON: model folders may run their own Python code in this app.",
        "zh": "⚠️ 已开启 trust_remote_code：模型文件夹中的 Python 代码可能会在本程序中运行。"},
    "model_info": {"en": "Model details", "zh": "模型详情"},
    # run-time messages
    "empty_message": {"en": "Type a message first.", "zh": "请先输入消息。"},
    "no_model": {"en": "No model is loaded yet: pick one and press Load.", "zh": "还没有加载模型：请选择模型并点击加载。"},
    "loading": {"en": "Loading {model} ({quant})…", "zh": "正在加载 {model}（{quant}）…"},
    "loaded": {"en": "**Loaded {model}** ({quant}, {dtype}) in {seconds:.1f} s · {split}",
               "zh": "**已加载 {model}**（{quant}，{dtype}），用时 {seconds:.1f} 秒 · {split}"},
    "switched": {"en": "Unloaded {old} in {seconds:.2f} s: freed {freed}, residual {residual}. Switch took {switch:.1f} s.",
                 "zh": "已卸载 {old}（{seconds:.2f} 秒）：释放 {freed}，残留 {residual}。切换共用 {switch:.1f} 秒。"},
    "load_failed": {"en": "**Could not load.** {error}", "zh": "**加载失败。** {error}"},
    "answer_failed": {"en": "The answer failed: {error}", "zh": "回答失败：{error}"},
    "current_model": {"en": "Current model: **{model}** ({quant})", "zh": "当前模型：**{model}**（{quant}）"},
    "predicted_vs_measured": {"en": "Weights: predicted {predicted}, measured {measured}.",
                              "zh": "权重：预测 {predicted}，实测 {measured}。"},
    "unavailable_quant": {"en": "Not available here: {items}", "zh": "此设备不可用：{items}"},
    "stopped": {"en": "stopped", "zh": "已停止"},
    "metrics": {"en": "TTFT {ttft} · {tps} tok/s · {tokens} tokens{extra}",
                "zh": "首字延迟 {ttft} · {tps} token/秒 · {tokens} 个 token{extra}"},
    "reused": {"en": " · {reused}/{prompt} prompt tokens reused from cache", "zh": " · 复用缓存 {reused}/{prompt} 个提示 token"},
    "dropped_notice": {"en": "Context full: left out the {n} oldest messages ({tokens} tokens allowed): {items}",
                       "zh": "上下文已满：已略去最早的 {n} 条消息（上限 {tokens} 个 token）：{items}"},
    "hit_length": {"en": " · hit max new tokens", "zh": " · 达到最大长度"},
    "was_stopped": {"en": " · stopped", "zh": " · 已停止"},
    # fit verdicts
    "fit_gpu": {"en": "✅ Fits on GPU: predicted peak {peak} of a {budget} budget.",
                "zh": "✅ 可以完全放进显卡：预测峰值 {peak}，预算 {budget}。"},
    "fit_offload": {"en": "⚠️ Fits with {offloaded} of {layers} layers offloaded ({where}); expect slower answers. GPU peak {peak} of a {budget} budget.",
                    "zh": "⚠️ 需要把 {layers} 层中的 {offloaded} 层卸载到{where}才能运行，回答会变慢。显存峰值 {peak}，预算 {budget}。"},
    "fit_cpu": {"en": "🖥️ No GPU: runs in RAM, predicted peak {peak} of {ram} free.",
                "zh": "🖥️ 没有 GPU：在内存中运行，预测峰值 {peak}，可用 {ram}。"},
    "fit_disk": {"en": "⚠️ No GPU and not enough RAM: {disk} of {layers} layers on disk; expect slow answers.",
                 "zh": "⚠️ 没有 GPU 且内存不足：{layers} 层中有 {disk} 层放在磁盘上，回答会很慢。"},
    "fit_none": {"en": "❌ Won't fit: {detail}", "zh": "❌ 放不下：{detail}"},
    "fit_breakdown": {"en": "weights {weights} (on GPU {gpu_weights}) + KV cache {kv} for {tokens} tokens + workspace {work} + CUDA context {ctx}",
                      "zh": "权重 {weights}（显卡上 {gpu_weights}）+ {tokens} 个 token 的 KV 缓存 {kv} + 工作区 {work} + CUDA 上下文 {ctx}"},
    "where_cpu": {"en": "{n} to CPU RAM", "zh": "内存（{n} 层）"},
    "where_disk": {"en": "{n} to disk", "zh": "磁盘（{n} 层）"},
    # memory panel
    "panel_title": {"en": "Memory", "zh": "内存占用"},
    "panel_no_cuda": {"en": "No CUDA GPU found: showing system RAM.", "zh": "未检测到 CUDA 显卡：显示系统内存。"},
    "seg_weights": {"en": "Weights", "zh": "权重"},
    "seg_kv": {"en": "KV cache", "zh": "KV 缓存"},
    "seg_workspace": {"en": "Workspace & allocator cache", "zh": "工作区与分配器缓存"},
    "seg_runtime": {"en": "CUDA context", "zh": "CUDA 上下文"},
    "seg_process": {"en": "Rest of this app", "zh": "本程序其他部分"},
    "seg_others": {"en": "Other processes", "zh": "其他进程"},
    "seg_free": {"en": "Free", "zh": "空闲"},
    "panel_total": {"en": "Total", "zh": "总计"},
    "panel_budget": {"en": "Budget", "zh": "预算"},
    "panel_room": {"en": "Room for {tokens} tokens of context · {sessions} chats cached ({kv})",
                   "zh": "可容纳 {tokens} 个 token 的上下文 · 已缓存 {sessions} 个对话（{kv}）"},
    "panel_peak": {"en": "Peak: predicted {predicted}, measured {measured}", "zh": "峰值：预测 {predicted}，实测 {measured}"},
}


def t(key: str, lang: str = "en", **values) -> str:
    """The text for `key` in `lang` (falls back to English), with {placeholders} filled."""
    entry = STRINGS[key]
    text = entry.get(lang) or entry["en"]
    return text.format(**values) if values else text


def gradio_i18n() -> gr.I18n:
    """All strings as a Gradio I18n object, so labels follow the browser's language."""
    return gr.I18n(**{lang: {k: v.get(lang) or v["en"] for k, v in STRINGS.items()} for lang in LANGUAGES})


def language_from_header(accept_language: str | None) -> str:
    """'zh' if the browser prefers Chinese over English, else 'en'."""
    for part in (accept_language or "").split(","):
        tag = part.split(";")[0].strip().lower()
        if tag.startswith("zh"):
            return "zh"
        if tag.startswith("en"):
            return "en"
    return "en"
