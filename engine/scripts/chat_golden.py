#!/usr/bin/env python3
"""Renders chat templates with Python jinja2 the way HF transformers' apply_chat_template does,
and writes the results as golden data for engine/tests/chat_template.rs.

HF compiles a template in an ImmutableSandboxedEnvironment with trim_blocks, lstrip_blocks and the
loopcontrols extension, adds the global raise_exception (which raises TemplateError), and renders
it with `messages`, `add_generation_prompt` and the special tokens (`bos_token`, `eos_token`).

Usage: engine/scripts/chat_golden.py   (needs `pip install jinja2`; rewrites the golden file)
"""

import json
import pathlib

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

DATA = pathlib.Path(__file__).resolve().parent.parent / "tests" / "data" / "chat"

MESSAGES = {
    "user": [{"role": "user", "content": "What is the capital of France?"}],
    "system_user": [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Capital of France?"},
    ],
    "multi_turn": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Say  two spaces,\nthen a newline and {{ braces }}."},
    ],
    "unicode": [{"role": "user", "content": "naïve café – 東京 🙂"}],
    "empty_content": [{"role": "user", "content": ""}],
}

# Each template with the message sets and generation-prompt flags to render.
CASES = [
    ("smollm2-135m-instruct.jinja", list(MESSAGES), [True, False]),
    ("conventions.jinja", list(MESSAGES), [True, False]),
]


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def render(source, messages, add_generation_prompt):
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.globals["raise_exception"] = raise_exception
    template = env.from_string(source)
    try:
        return {
            "rendered": template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token="<|im_start|>",
                eos_token="<|im_end|>",
            )
        }
    except jinja2.exceptions.TemplateError as error:
        return {"error": str(error)}


def main():
    cases = []
    for template_file, message_sets, flags in CASES:
        source = (DATA / template_file).read_text()
        for name in message_sets:
            for flag in flags:
                case = {
                    "template": template_file,
                    "messages_name": name,
                    "messages": MESSAGES[name],
                    "add_generation_prompt": flag,
                }
                case.update(render(source, MESSAGES[name], flag))
                cases.append(case)
    golden = {
        "renderer": f"jinja2 {jinja2.__version__} (ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks, loopcontrols)",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "cases": cases,
    }
    out = DATA / "golden.json"
    out.write_text(json.dumps(golden, indent=1, ensure_ascii=False) + "\n")
    print(f"{out}: {len(cases)} cases")


if __name__ == "__main__":
    main()
