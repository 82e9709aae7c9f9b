"""Chat templates the export can record in a model's manifest (Jinja, as onnxruntime-genai's
``Tokenizer.apply_chat_template(template_str=...)`` renders them).

SmolLM2 (and any GGUF or Hugging Face folder that carries one) uses its own template, read by
:func:`encloud.server.inference.manifest.read_chat_template`. Vicuna v1.1/v1.5 checkpoints ship
none; :data:`VICUNA_V1_1` reproduces FastChat's ``vicuna_v1.1`` conversation
(``fastchat/conversation.py``: ``SeparatorStyle.ADD_COLON_TWO``, ``sep=" "``, ``sep2="</s>"``)::

    ret = system + " "
    for i, (role, message) in enumerate(messages):
        ret += role + ": " + message + [" ", "</s>"][i % 2] if message else role + ":"

with roles ``USER`` / ``ASSISTANT``; a leading system message replaces the default system line.
"""

from __future__ import annotations

VICUNA_V1_1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

VICUNA_V1_1 = (
    "{% if messages[0]['role'] == 'system' %}"
    "{{ messages[0]['content'] }}"
    "{% else %}"
    "{{ '" + VICUNA_V1_1_SYSTEM.replace("'", "\\'") + "' }}"
    "{% endif %}"
    "{{ ' ' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ 'USER: ' + message['content'] + ' ' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ 'ASSISTANT: ' + message['content'] + '</s>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

TEMPLATES = {"vicuna_v1.1": VICUNA_V1_1}

__all__ = ["TEMPLATES", "VICUNA_V1_1", "VICUNA_V1_1_SYSTEM"]
