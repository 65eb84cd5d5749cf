"""How an instruction-tuning (sft) prompt, and the response after it, become token ids.

Two formats. With `task.template` set, the prompt is put into it (`{prompt}` replaced), the
response follows directly and ends with EOS. With `task.template` null (the default) and a
tokenizer that comes with a chat template (a Hub model's `tokenizer_config.json` or
`chat_template.jinja`), the prompt is one user message in that template, with the generation
prompt (the assistant's header), and the response is the assistant's turn exactly as the template
writes it, up to and including the special token that ends the turn (`<|im_end|>`,
`<|eot_id|>`, ...). A null `task.template` with a tokenizer without one means `DEFAULT_TEMPLATE`.

Training (finetune/data.py), the samples printed while training (finetune/tasks.py), `lmforge
generate` and the export (finetune/export.py: the tokenizer keeps its chat template, or gets one
that renders `task.template`) all take the format from here, so they agree token for token with
each other and with transformers' ``apply_chat_template(..., add_generation_prompt=True)``.
"""

from __future__ import annotations

from lmforge.pretrain.core.errors import DataError
from lmforge.pretrain.data.tokenizer import Tokenizer

DEFAULT_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"


class PromptFormat:
    """The sft format of one tokenizer and `task.template` (module docstring)."""

    def __init__(self, tok: Tokenizer, template: str | None) -> None:
        self.tok = tok
        self.chat = template is None and tok.chat_template is not None
        self.template = None if self.chat else (template or DEFAULT_TEMPLATE)
        eos = [tok.eos_id] if tok.eos_id is not None else []
        # the ids that end a response: generation stops at the first
        self.stop_ids: tuple[int, ...] = tuple(self._end_of_turn() + eos if self.chat else eos)

    def describe(self) -> str:
        if self.chat:
            return f"the chat template of {self.tok.path} (one user message)"
        return f"the template {self.template!r}"

    def prompt_ids(self, prompt: str) -> list[int]:
        """The ids a response is generated after."""
        if self.chat:
            return self.tok.encode_special(self._render(prompt, None))
        return self.tok.encode(self.template.replace("{prompt}", prompt))

    def example(self, prompt: str, response: str) -> tuple[list[int], list[int]]:
        """The ids of the prompt and those of the response that follows it, which end with a
        stop id."""
        if not self.chat:
            return self.prompt_ids(prompt), self.tok.encode(response) + list(self.stop_ids)
        head, turn = self._split(prompt, response)
        ids = self.tok.encode_special(turn)
        end = next((k for k, t in enumerate(ids) if t in self.stop_ids), len(ids) - 1)
        return self.tok.encode_special(head), ids[: end + 1]  # (nothing the model never writes)

    def _render(self, prompt: str, response: str | None) -> str:
        messages = [{"role": "user", "content": prompt}]
        if response is not None:
            messages.append({"role": "assistant", "content": response})
        return self.tok.render_chat(messages, add_generation_prompt=response is None)

    def _split(self, prompt: str, response: str) -> tuple[str, str]:
        """The rendered prompt (with the generation prompt) and the assistant turn after it."""
        head, full = self._render(prompt, None), self._render(prompt, response)
        if not full.startswith(head):
            raise DataError(
                f"the chat template of {self.tok.path} does not write a conversation as its "
                "prompt (with add_generation_prompt) followed by the answer, so the answer's "
                "tokens cannot be told apart; set `task.template` to use a prompt template instead"
            )
        return head, full[len(head) :]

    def _end_of_turn(self) -> list[int]:
        """The special token the template writes after an answer (`<|im_end|>`, ...)."""
        _, turn = self._split("?", "!")
        after = turn[turn.find("!") + 1 :] if "!" in turn else ""
        special = self.tok.special_ids()
        ends = [i for i in self.tok.encode_special(after) if i in special][:1]
        if not ends and self.tok.eos_id is None:
            raise DataError(
                f"the chat template of {self.tok.path} ends an answer with no special token and "
                "the tokenizer has no EOS: nothing would end a response; set `task.template`"
            )
        return ends
