"""Constrained decoding with xgrammar, the library vLLM and SGLang use: `response_format`'s JSON and the calls that a
`tool_choice` forces become grammars, and each constrained row of the scheduler's batch (model/scheduler.py) has its
own matcher, whose token bitmask is applied to that row's logits before sampling.

A grammar alone does not make the output parse: a JSON string may go on until max_tokens. So each row also keeps
the promise to finish within its budget: `Matcher.choose` accepts the sampled token only if the shortest way it
knows to complete the grammar from there still fits in the tokens left, and otherwise takes the first token of
that way. The way is a deterministic "closer" (close the open string, then the open objects and arrays, fill what
the schema still requires with the shortest value), so its length is exact and the budget check is too.
JSON is compact (no whitespace, "," and ":" alone), as the chat template writes calls.
"""
import json

import numpy as np
import torch

from .tokenizer import CALL_CLOSE, CALL_OPEN

# What the closer writes, best first. Inside a string: close it. Outside: close an object or array, go to the next
# item, or write the shortest value (0, then an empty string). Where none of these is allowed (a key or literal the
# schema fixes, a digit a range needs), the first allowed token: the grammar itself then leaves one way forward.
IN_STRING, OUTSIDE = '"', '}],0"'
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}  # a tool without: arguments {}


def _first_allowed(bitmask_row: torch.Tensor, vocab_size: int) -> int | None:
    words = bitmask_row.nonzero()
    if not len(words):
        return None
    word = int(words[0, 0])
    bits = int(bitmask_row[word]) & 0xFFFFFFFF
    token = word * 32 + (bits & -bits).bit_length() - 1
    return token if token < vocab_size else None


class Grammars:
    """Compiles grammars for one tokenizer and model vocabulary (xgrammar caches compiled schemas)."""

    def __init__(self, tokenizer, vocab_size: int):
        import xgrammar as xgr

        self.xgr, self.vocab_size, self.eos = xgr, vocab_size, tokenizer.eos_token_id
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=[self.eos])
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1)
        self.encode = lambda text: tokenizer.encode(text, add_special_tokens=False)
        # Each token's bytes, for the closer's one piece of state: inside a JSON string or not.
        self.token_bytes = self.info.decoded_vocab
        singles = {}
        for token, piece in enumerate(self.token_bytes):
            if len(piece) == 1 and token not in self.info.special_token_ids:
                singles.setdefault(piece.decode("latin-1"), token)
        self.preference = {inside: [singles[c] for c in (IN_STRING if inside else OUTSIDE) if c in singles]
                           for inside in (True, False)}
        # Tokens with a control byte are never valid in compact JSON or in the call tags, yet xgrammar 0.2 lets a
        # string with maxLength take them (json.loads then refuses the output): their bits are cleared in every mask.
        allowed = np.ones(-(-vocab_size // 32) * 32, dtype=bool)
        for token, piece in enumerate(self.token_bytes):
            allowed[token] = not any(byte < 0x20 for byte in piece) or token in self.info.special_token_ids
        self.keep = torch.from_numpy(np.packbits(allowed, bitorder="little").view(np.int32).copy())  # bit t: token t

    def json(self, schema: dict | None = None):
        """Any JSON object (response_format json_object), or one that matches `schema` (json_schema)."""
        if schema is None:
            return self.compiler.compile_json_schema({"type": "object"}, any_whitespace=False, strict_mode=False,
                                                     separators=(",", ":"))
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"))

    def tool_calls(self, tools: list[dict], parallel: bool = True):
        """`<tool_call>{"name":N,"arguments":A}</tool_call>`, once or (parallel) more times, N one of `tools` and A
        its parameters' schema: what tool_choice "required" or a named function allows."""
        from xgrammar.structural_tag import GrammarFormat, StructuralTag, TagFormat, TagsWithSeparatorFormat

        tags = []
        for tool in tools:
            schema = json.dumps(tool.get("parameters") or NO_PARAMETERS)
            arguments = str(self.xgr.Grammar.from_json_schema(schema, any_whitespace=False, separators=(",", ":")))
            tags.append(TagFormat(begin=f'{CALL_OPEN}{{"name":{json.dumps(tool["name"])},"arguments":',
                                  content=GrammarFormat(grammar=arguments), end=f"}}{CALL_CLOSE}"))
        form = TagsWithSeparatorFormat(tags=tags, separator="", at_least_one=True, stop_after_first=not parallel)
        return self.compiler.compile_structural_tag(StructuralTag(format=form))

    def matcher(self, compiled) -> "Matcher":
        return Matcher(self, compiled)

    def closing_length(self, compiled, limit: int) -> int:
        """Tokens the closer needs from the start: a budget below it cannot end in parsable output."""
        return self.matcher(compiled).closing_length(limit)


class Matcher:
    """One row's grammar state: its bitmask for the next token, the tokens accepted, the budget kept."""

    def __init__(self, grammars: Grammars, compiled, parent: "Matcher | None" = None):
        self.grammars = grammars
        if parent is None:
            self.matcher = grammars.xgr.GrammarMatcher(compiled)
            self.in_string = self.escaped = False
            # This row's own bitmask of the tokens allowed next, on the CPU where xgrammar fills it (also the
            # closer's scratch): no other row's state is ever in it.
            self.bitmask = grammars.xgr.allocate_token_bitmask(1, grammars.vocab_size)
        else:  # a copy to try the closer on, in the parent's thread
            self.matcher, self.bitmask = parent.matcher.fork(), parent.bitmask
            self.in_string, self.escaped = parent.in_string, parent.escaped

    @property
    def complete(self) -> bool:
        """The output so far is a whole sentence of the grammar (it may go on: a number can take more digits)."""
        return self.matcher.is_completed()

    def fill(self):
        self.matcher.fill_next_token_bitmask(self.bitmask, 0)
        self.bitmask[0] &= self.grammars.keep

    def mask(self, logits: torch.Tensor):
        """Set what the grammar forbids next to -inf in `logits`, this row's (vocab,) fp32 logits, in place. The
        row must be contiguous: xgrammar's CPU kernel reads its buffer as such whatever the strides say (a
        transposed batch would spread one row's mask over all rows)."""
        if logits.dim() != 1 or not logits.is_contiguous():
            raise ValueError(f"a grammar masks one contiguous row of logits, got shape {tuple(logits.shape)} strides "
                             f"{logits.stride()}")
        self.fill()
        bitmask = self.bitmask if self.bitmask.device == logits.device else self.bitmask.to(logits.device)
        self.grammars.xgr.apply_token_bitmask_inplace(logits[None], bitmask, vocab_size=self.grammars.vocab_size)

    def _advance(self, token: int) -> bool:
        if not self.matcher.accept_token(token):
            return False
        for byte in self.grammars.token_bytes[token]:  # track JSON strings: an unescaped quote opens or closes one
            if self.escaped:
                self.escaped = False
            elif byte == 0x5C and self.in_string:
                self.escaped = True
            elif byte == 0x22:
                self.in_string = not self.in_string
        return True

    def _close_step(self) -> int:
        """Accept the closer's next token and return it (EOS once the grammar is complete)."""
        g = self.grammars
        if self.matcher.is_completed():
            self.matcher.accept_token(g.eos)
            return g.eos
        forced = self.matcher.find_jump_forward_string()  # text the grammar fixes from here: take it in long tokens
        if forced and self._advance(token := g.encode(forced)[0]):
            return token
        self.fill()
        bits = self.bitmask[0]
        for token in g.preference[self.in_string and not self.escaped]:
            if (int(bits[token // 32]) >> (token % 32)) & 1:
                self._advance(token)
                return token
        token = _first_allowed(bits, g.vocab_size)
        if token is None or not self._advance(token):
            self.matcher.accept_token(g.eos)
            return g.eos
        return token

    def closing_length(self, limit: int) -> int:
        """Tokens the closer writes from here until the grammar is complete; limit + 1 if more."""
        fork = Matcher(self.grammars, None, parent=self)
        for count in range(limit + 1):
            if fork.matcher.is_completed():
                return count
            if fork._close_step() == self.grammars.eos:
                break
        return limit + 1

    def choose(self, token: int, left: int) -> int:
        """Accept the sampled `token` (already masked) if the grammar can still complete in the `left - 1` tokens
        that remain after it, else the closer's token instead. Returns the token accepted; EOS costs no budget."""
        eos, before = self.grammars.eos, (self.in_string, self.escaped)
        if token == eos and self.matcher.is_completed():
            self.matcher.accept_token(token)
            return token
        if token != eos and self._advance(token):
            if self.closing_length(left - 1) <= left - 1:
                return token
            self.matcher.rollback(1)
            self.in_string, self.escaped = before
        return self._close_step()
