"""UI text in English and Chinese. Static labels go through Gradio's I18n (browser language);
messages composed at run time use `t(key, lang)` with the language the user picked. What the
engine says (its errors, fit verdicts, why a quantization cannot run) is not here: it comes from
the engine's own table (models/messages.py), which `explain` looks up."""

from __future__ import annotations

import gradio as gr

from models.facade import Message, QuantOption, UserFacingError

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
    "kv_fp8": {"en": "fp8 (half the memory of fp16: twice the context; same speed on a GPU, ~3x slower on a CPU)",
               "zh": "fp8（显存为 fp16 的一半，可容纳两倍上下文；GPU 上速度不变，CPU 上约慢 3 倍）"},
    "kv_offload": {"en": "offloaded to CPU RAM (GPU only: frees the cache's VRAM, ~12 % slower decode at 7B)",
                   "zh": "卸载到内存（仅 GPU：不占显存，7B 解码约慢 12%）"},
    "overflow_policy": {"en": "When the chat outgrows the context", "zh": "对话超出上下文时"},
    "policy_drop_oldest": {"en": "drop the oldest turns (keep the system prompt)", "zh": "丢弃最早的轮次（保留系统提示词）"},
    "policy_refuse": {"en": "refuse and tell me", "zh": "拒绝并提示我"},
    "trust_remote_code_warning": {
        "en": "⚠️ trust_remote_code is ON: model folders may run their own Python code in this app.",
        "zh": "⚠️ 已开启 trust_remote_code：模型文件夹中的 Python 代码可能会在本程序中运行。"},
    "model_info": {"en": "Model details", "zh": "模型详情"},
    # run-time messages
    "bad_number": {"en": "{name} must be {kind} from {low} to {high} (got {value}).",
                   "zh": "{name}必须是 {low} 到 {high} 之间的{kind}（收到 {value}）。"},
    # Said after a generation setting's bad_number only: a load or a comparison has no message to keep.
    "nothing_sent_kept": {"en": "Nothing was sent; your message is kept.", "zh": "未发送，您的消息已保留。"},
    "number": {"en": "a number", "zh": "数字"},
    "whole_number": {"en": "a whole number", "zh": "整数"},
    "unsent_title": {"en": "Not sent (too long for the context): copied back into the message box",
                     "zh": "未发送（超出上下文长度）：已复制回消息框"},
    "sampling_from_generation_config": {
        "en": "Sampling defaults: temperature {temperature}, top-p {top_p}, from {model}'s generation_config.json.",
        "zh": "默认采样：温度 {temperature}，top-p {top_p}，来自 {model} 的 generation_config.json。"},
    "sampling_from_catalog": {
        "en": "Sampling defaults: temperature {temperature}, top-p {top_p}, recommended for {model} (models/catalog.toml).",
        "zh": "默认采样：温度 {temperature}，top-p {top_p}，为 {model} 推荐的设置（models/catalog.toml）。"},
    "sampling_from_app": {
        "en": "Sampling defaults: temperature {temperature}, top-p {top_p} (the app's own: {model} recommends none).",
        "zh": "默认采样：温度 {temperature}，top-p {top_p}（本程序的默认值：{model} 没有推荐设置）。"},
    "sampling_from_cli": {"en": "Sampling: temperature {temperature}, top-p {top_p}, set on the command line.",
                          "zh": "采样：温度 {temperature}，top-p {top_p}，由命令行设定。"},
    "message_too_many_chars": {
        "en": "Your message is {chars} characters; the limit is {limit} (--max-message-chars). Nothing was sent; shorten it.",
        "zh": "您的消息有 {chars} 个字符，上限为 {limit}（--max-message-chars）。未发送，请缩短。"},
    "empty_message": {"en": "Type a message first.", "zh": "请先输入消息。"},
    "answer_running": {"en": "An answer is still being written: wait for it, or press Stop first. Your text is kept.",
                       "zh": "回答仍在生成中：请等待，或先点击停止。您输入的内容已保留。"},
    "loading": {"en": "Loading {model} ({quant})…", "zh": "正在加载 {model}（{quant}）…"},
    "loaded": {"en": "**Loaded {model}** ({quant}, {dtype}) in {seconds:.1f} s · {split}",
               "zh": "**已加载 {model}**（{quant}，{dtype}），用时 {seconds:.1f} 秒 · {split}"},
    "switched": {"en": "Unloaded {old} in {seconds:.2f} s: freed {freed}, residual {residual}. Switch took {switch:.1f} s.",
                 "zh": "已卸载 {old}（{seconds:.2f} 秒）：释放 {freed}，残留 {residual}。切换共用 {switch:.1f} 秒。"},
    "load_failed": {"en": "**Could not load.** {error}", "zh": "**加载失败。** {error}"},
    "answer_failed": {"en": "The answer failed: {error}", "zh": "回答失败：{error}"},
    "kept_model": {"en": "Still using **{model}** ({quant}): the model box is set back to it.",
                   "zh": "仍在使用 **{model}**（{quant}）：模型选择框已恢复为该模型。"},
    "current_model": {"en": "Current model: **{model}** ({quant})", "zh": "当前模型：**{model}**（{quant}）"},
    "already_resident": {"en": "**{model}** ({quant}) is already in memory: this tab uses it now, nothing was loaded.",
                         "zh": "**{model}**（{quant}）已在内存中：本标签页现在使用它，无需加载。"},
    "only_this_tab": {"en": "Only this tab switched: other tabs keep their own models.",
                      "zh": "只有本标签页切换了模型：其他标签页仍使用各自的模型。"},
    "residents_gpu": {"en": "On the GPU now: {models}", "zh": "显卡上现有：{models}"},
    "residents_cpu": {"en": "In memory now: {models}", "zh": "内存中现有：{models}"},
    "residents_none": {"en": "no model", "zh": "没有模型"},
    "residents_loading": {"en": " · loading {model}…", "zh": " · 正在加载 {model}…"},
    "resident_remote": {"en": " (remote engine)", "zh": "（远程推理引擎）"},
    "predicted_vs_measured": {"en": "Weights: predicted {predicted}, measured {measured}.",
                              "zh": "权重：预测 {predicted}，实测 {measured}。"},
    "unavailable_quant": {"en": "Not available here: {items}", "zh": "此设备不可用：{items}"},
    "stopped": {"en": "stopped", "zh": "已停止"},
    "metrics": {"en": "{waited}TTFT {ttft}{turn} · {tps} tok/s · {tokens} tokens{extra}",
                "zh": "{waited}首字延迟 {ttft}{turn} · {tps} token/秒 · {tokens} 个 token{extra}"},
    "waited": {"en": "waited {seconds} s · ", "zh": "排队 {seconds} 秒 · "},
    "after_turn": {"en": " ({seconds} s after its turn)", "zh": "（轮到后 {seconds} 秒）"},
    "reused": {"en": " · {reused}/{prompt} prompt tokens reused from cache", "zh": " · 复用缓存 {reused}/{prompt} 个提示 token"},
    "dropped_notice": {"en": "Context full: left out the {n} oldest messages ({tokens} tokens allowed): {items}",
                       "zh": "上下文已满：已略去最早的 {n} 条消息（上限 {tokens} 个 token）：{items}"},
    "hit_length": {"en": " · hit max new tokens", "zh": " · 达到最大长度"},
    "answered_by": {"en": " · by {model}", "zh": " · 由 {model} 生成"},
    "was_stopped": {"en": " · stopped", "zh": " · 已停止"},
    # fit verdicts: the plan's own sentence comes from models/messages.py
    "split_gpus": {"en": "{layers} on {n} GPUs", "zh": "{n} 张显卡上分别 {layers} 层"},
    "fit_remote": {"en": "🌐 Remote engine: {detail}. Press Load to check the server.",
                   "zh": "🌐 远程推理引擎：{detail}。点击加载以检查服务器。"},
    "loaded_remote": {"en": "**Connected to {model}** in {seconds:.1f} s · context {context} tokens (the server's limit)",
                      "zh": "**已连接 {model}**，用时 {seconds:.1f} 秒 · 上下文 {context} 个 token（服务器的上限）"},
    "panel_remote": {"en": "Model served by the remote engine at {url}: its weights and KV cache live in that engine's memory. "
                           "The bar above is this machine's memory (this process and its local chats).",
                     "zh": "模型由 {url} 的远程推理引擎提供：其权重和 KV 缓存都在该引擎的内存中。上方条形图为本机内存（本进程及本地对话）。"},
    "panel_remote_kv": {"en": "Engine KV cache in use: {usage} · requests running {running}, waiting {waiting} (its /metrics)",
                        "zh": "引擎 KV 缓存已用：{usage} · 运行中请求 {running}，等待中 {waiting}（来自其 /metrics）"},
    "panel_remote_no_metrics": {"en": "The engine reports no KV-cache use (no vLLM /metrics).",
                                "zh": "该引擎没有报告 KV 缓存用量（没有 vLLM 的 /metrics）。"},
    "compare_remote": {"en": "remote engine, checked in {seconds:.1f} s · memory: the engine's",
                       "zh": "远程推理引擎，检查用时 {seconds:.1f} 秒 · 内存：由该引擎占用"},
    "split_layers": {"en": "layers: {parts}", "zh": "层分布：{parts}"},
    "list_sep": {"en": ", ", "zh": "，"},
    "split_gpu": {"en": "{n} on GPU", "zh": "GPU 上 {n} 层"},
    "split_cpu": {"en": "{n} in CPU RAM", "zh": "内存中 {n} 层"},
    "split_streamed": {"en": " (prefetched a layer ahead)", "zh": "（提前一层预取）"},
    "split_disk": {"en": "{n} on disk", "zh": "磁盘上 {n} 层"},
    "fit_breakdown": {"en": "weights {weights} (on GPU {gpu_weights}) + KV cache {kv} for {tokens} tokens + workspace {work} + CUDA context {ctx}",
                      "zh": "权重 {weights}（显卡上 {gpu_weights}）+ {tokens} 个 token 的 KV 缓存 {kv} + 工作区 {work} + CUDA 上下文 {ctx}"},
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
    "panel_room": {"en": "Room for {tokens} tokens of context · chats cached: {sessions} ({kv})",
                   "zh": "可容纳 {tokens} 个 token 的上下文 · 已缓存 {sessions} 个对话（{kv}）"},
    "panel_step": {"en": "Decode step: {status}", "zh": "解码步骤：{status}"},
    "panel_room_memory": {"en": " · the memory left would hold {tokens} (raise the context length to use it)",
                          "zh": " · 剩余内存可容纳 {tokens} 个 token（调高上下文长度即可使用）"},
    "panel_peak": {"en": "Peak: predicted {predicted}, measured {measured}", "zh": "峰值：预测 {predicted}，实测 {measured}"},
    # compare tab
    "tab_compare": {"en": "Compare", "zh": "对比"},
    "compare_intro": {
        "en": "Pick A and B (model + quantization). Both answer the same prompt with the same sampling settings and seed; "
              "A answers first, then B (one model computes at a time).",
        "zh": "选择 A 和 B（模型 + 量化方式）。两者用相同的采样设置和随机种子回答同一个提示；"
              "先 A 后 B（同一时间只有一个模型在计算）。"},
    "compare_model_a": {"en": "Model A", "zh": "模型 A"},
    "compare_quant_a": {"en": "Quantization A", "zh": "量化方式 A"},
    "compare_model_b": {"en": "Model B", "zh": "模型 B"},
    "compare_quant_b": {"en": "Quantization B", "zh": "量化方式 B"},
    "compare_prompt": {"en": "Prompt", "zh": "提示"},
    "compare_prompt_placeholder": {"en": "One prompt for both A and B", "zh": "A 和 B 共用的一个提示"},
    "compare_seed": {"en": "Seed (same for A and B)", "zh": "随机种子（A 与 B 相同）"},
    "compare_run": {"en": "Compare", "zh": "开始对比"},
    "compare_answer_a": {"en": "Answer A", "zh": "回答 A"},
    "compare_answer_b": {"en": "Answer B", "zh": "回答 B"},
    "compare_waiting": {"en": "_Waiting…_", "zh": "_等待中…_"},
    "compare_loading": {"en": "_Loading {config}…_", "zh": "_正在加载 {config}…_"},
    "compare_error": {"en": "Error: {error}", "zh": "出错：{error}"},
    "compare_empty_prompt": {"en": "Type a prompt first.", "zh": "请先输入提示。"},
    "compare_metrics_live": {"en": "TTFT {ttft} · {tokens} tokens so far…", "zh": "首字延迟 {ttft} · 已生成 {tokens} 个 token…"},
    "compare_metrics": {"en": "TTFT {ttft} · {tps} tok/s · {tokens} tokens · peak {peak}",
                        "zh": "首字延迟 {ttft} · {tps} token/秒 · {tokens} 个 token · 峰值 {peak}"},
    "compare_load": {"en": "loaded in {seconds:.1f} s · weights {weights}", "zh": "加载用时 {seconds:.1f} 秒 · 权重 {weights}"},
    "compare_resident": {"en": "already loaded · weights {weights}", "zh": "已在内存中 · 权重 {weights}"},
    "compare_fit_together": {"en": "✅ A and B fit the budget together: both stay loaded.",
                             "zh": "✅ A 和 B 可以同时放进预算：两者都保持加载。"},
    "compare_fit_swap": {"en": "🔁 A and B do not fit the budget together: they are loaded in turn (swapped), never both at once.",
                         "zh": "🔁 A 和 B 无法同时放进预算：将轮流加载（换入换出），不会同时占用。"},
    "compare_swapped": {"en": "🔁 Swap: loading {config} unloaded {old}; unload + load took {seconds:.1f} s.",
                        "zh": "🔁 换入换出：加载 {config} 时卸载了 {old}；卸载加加载共用 {seconds:.1f} 秒。"},
    "compare_residents": {"en": "Loaded now: {models}", "zh": "当前已加载：{models}"},
    "compare_batch": {"en": "Batch run: a prompt set through several configurations", "zh": "批量运行：用多个配置跑一整套提示"},
    "compare_set": {"en": "Prompt set (from prompts/)", "zh": "提示集（来自 prompts/）"},
    "compare_upload": {"en": "…or your own prompt-set file (.toml)", "zh": "…或上传你自己的提示集文件（.toml）"},
    "compare_paste": {"en": "…or paste questions, one per line (used first when not empty)",
                      "zh": "…或粘贴问题，每行一个（不为空时优先使用）"},
    "compare_use": {"en": "Configurations", "zh": "配置"},
    "compare_extra": {"en": "More configurations, MODEL:QUANT one per line (e.g. smollm2-135m-instruct:8bit)",
                      "zh": "更多配置，每行一个 模型:量化（例如 smollm2-135m-instruct:8bit）"},
    "compare_batch_run": {"en": "Run batch", "zh": "运行批量"},
    "compare_results": {"en": "Results", "zh": "结果"},
    "compare_csv": {"en": "CSV", "zh": "CSV"},
    "compare_jsonl": {"en": "JSONL", "zh": "JSONL"},
    "compare_batch_start": {"en": "Running {name}…", "zh": "正在运行 {name}…"},
    "compare_batch_progress": {"en": "**{done}/{total}** answers so far.", "zh": "已完成 **{done}/{total}** 个回答。"},
    "compare_batch_done": {"en": "**Done: {done}/{total}** answers. Download the CSV or JSONL below.",
                           "zh": "**完成：{done}/{total}** 个回答。可在下方下载 CSV 或 JSONL。"},
    "quality_title": {"en": "Quality cost of quantization", "zh": "量化的质量代价"},
    "quality_intro": {
        "en": "Scores a fixed English text (prompts/quality_text.txt) with the quantized load and with full precision: "
              "perplexity of each and the top-1 next-token agreement, next to the memory saved and the speed gained.",
        "zh": "用量化版本和全精度版本分别对一段固定英文文本（prompts/quality_text.txt）打分："
              "给出各自的困惑度和下一个 token 的 top-1 一致率，以及节省的内存和速度变化。"},
    "quality_model": {"en": "Model", "zh": "模型"},
    "quality_quant": {"en": "Quantization to check", "zh": "要检查的量化方式"},
    "quality_run": {"en": "Check quality", "zh": "检查质量"},
    "quality_head": {"en": "**{model}** on {tokens} next-token predictions:", "zh": "**{model}**，共 {tokens} 个下一 token 预测："},
    "quality_ppl": {"en": "Perplexity (lower is better)", "zh": "困惑度（越低越好）"},
    "quality_weights": {"en": "Weights in memory", "zh": "权重占用内存"},
    "quality_decode": {"en": "Decode speed (tok/s)", "zh": "解码速度（token/秒）"},
    "quality_forward": {"en": "Prefill speed (tok/s)", "zh": "预填充速度（token/秒）"},
    "quality_summary": {"en": "Top-1 agreement **{agreement}** · perplexity {ppl_change} · memory saved **{saved}** · decode speed {speed}",
                        "zh": "top-1 一致率 **{agreement}** · 困惑度变化 {ppl_change} · 节省内存 **{saved}** · 解码速度 {speed}"},
    "quality_placement": {"en": "Runs on (offload/disk: speed not comparable)", "zh": "运行位置（卸载/磁盘时速度不可比）"},
    "quality_no_fit": {"en": "Not measured: {note}", "zh": "无法测量：{note}"},
    "device_cpu": {"en": "CPU (no CUDA GPU found)", "zh": "CPU（未检测到 CUDA 显卡）"},
    # results table of a batch run (compare/results columns)
    "col_question_no": {"en": "#", "zh": "#"},
    "col_config": {"en": "config", "zh": "配置"},
    "col_question": {"en": "question", "zh": "问题"},
    "col_answer": {"en": "answer", "zh": "回答"},
    "col_new_tokens": {"en": "tokens", "zh": "token 数"},
    "col_ttft_s": {"en": "TTFT s", "zh": "首字延迟 秒"},
    "col_tokens_per_s": {"en": "tok/s", "zh": "token/秒"},
    "col_peak_mib": {"en": "peak MiB", "zh": "峰值 MiB"},
    "col_load_s": {"en": "load s", "zh": "加载 秒"},
    "col_keywords": {"en": "keywords", "zh": "关键词"},
    "col_score": {"en": "score", "zh": "得分"},
    "col_error": {"en": "error", "zh": "错误"},
    # saving, exporting and importing the chat (ui/persist.py)
    "persist_export_json": {"en": "Export chat (JSON)", "zh": "导出对话（JSON）"},
    "persist_export_md": {"en": "Export chat (Markdown)", "zh": "导出对话（Markdown）"},
    "persist_import": {"en": "Import chat (JSON)", "zh": "导入对话（JSON）"},
    "persist_file": {"en": "Exported chat", "zh": "导出的对话"},
    "persist_restored": {"en": "Restored your chat from this browser ({n} messages).",
                         "zh": "已从本浏览器恢复您的对话（{n} 条消息）。"},
    "persist_restore_failed": {"en": "⚠️ The chat saved in this browser could not be read ({error}); starting a new one.",
                               "zh": "⚠️ 无法读取本浏览器中保存的对话（{error}），已开始新对话。"},
    "persist_import_failed": {"en": "⚠️ Import failed: {error} Your current chat is kept.",
                              "zh": "⚠️ 导入失败：{error} 当前对话已保留。"},
    "persist_imported": {"en": "Imported {n} messages from {name}.", "zh": "已从 {name} 导入 {n} 条消息。"},
    "persist_other_model": {"en": "It was written with {model} ({quant}); the model in use is {current}.",
                            "zh": "该对话由 {model}（{quant}）生成；当前使用的模型是 {current}。"},
    # bad input (issue 12): refused before it is sent
    "message_invalid_text": {"en": "Your message has text that is not valid Unicode (an unpaired surrogate at character {at}); it was not sent. Remove or retype that character.",
                             "zh": "消息中含有无效的 Unicode 文本（第 {at} 个字符是不成对的代理项），未发送。请删除或重新输入该字符。"},
}


def t(key: str, lang: str = "en", **values) -> str:
    """The text for `key` in `lang` (falls back to English), with {placeholders} filled."""
    entry = STRINGS[key]
    text = entry.get(lang) or entry["en"]
    return text.format(**values) if values else text


def explain(error: BaseException | Message, lang: str = "en") -> str:
    """An engine error or message in `lang`, looked up in the engine's one table (models/messages.py)."""
    if isinstance(error, UserFacingError):
        return error.render(lang)
    if isinstance(error, Message):
        return error.render(lang)
    return str(error)  # the UI's own errors (BadNumber) are already in the user's language


def explain_quant(option: QuantOption, lang: str = "en") -> str:
    """Why a quantization is unavailable, in `lang`."""
    return option.why.render(lang) if option.why else ""


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
