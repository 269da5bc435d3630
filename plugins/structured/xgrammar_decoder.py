"""The ``xgrammar`` guided decoder with V1's ``no_fallback`` semantics.

Every spec is checked before it is compiled. What xgrammar 0.2.8 would
silently ignore or loosen is rejected with ``UnsupportedStructuredOutput``,
so whatever the matcher lets through satisfies the request's constraint (it
may be a subset: xgrammar's strict mode forbids properties a schema does not
declare, and a string with a length or pattern is produced without escapes).
Keywords JSON Schema does not define (``discriminator``, ``x-*``) are
annotations, as they are to any validator.

The JSON-schema subset was measured on xgrammar 0.2.8 by compiling each
keyword with and without it and matching instances against the grammar:

- a node with ``$ref``, ``anyOf``, ``oneOf``, ``allOf``, ``const`` or ``enum``
  ignores its sibling keywords, so siblings other than annotations are
  rejected (``type`` may accompany ``const``/``enum`` when every value has it);
- type-specific keywords are ignored when ``type`` is missing, except that
  ``properties`` implies an object and ``items``/``prefixItems`` an array;
- ``oneOf`` is matched as ``anyOf``: accepted only when its alternatives are
  provably disjoint (by type, by value, or by a required const property);
- ``allOf`` is merged only when it has a single subschema;
- ``pattern`` or ``format`` next to ``minLength``/``maxLength`` drops the
  lengths, ``format`` next to ``pattern`` drops the pattern; ``multipleOf``
  is enforced for integers only; a ``required`` name missing from
  ``properties`` is ignored; regex lookarounds and mid-pattern anchors are
  dropped, and unknown letter escapes match the letter;
- worse, some string rules emit invalid JSON (raw control characters or
  quotes): ``minLength``/``maxLength`` (rewritten here as an equivalent
  ``pattern`` without escapes), pattern repetitions counted above 128
  (rejected) and the ``json-pointer`` formats (rejected); ``ipv4`` admits
  leading zeros (rejected).

A limit this module cannot lift: xgrammar's "any character" admits invalid
UTF-8 (surrogates, and overlong encodings inside a JSON ``pattern``), which
detokenizes as U+FFFD. ``.`` and string lengths are rewritten into exact
ranges and negated regex classes exclude the surrogates, but free JSON
strings, ``json_object``, EBNF negated classes, ``\\W``/``\\S``/``\\D`` and
negated classes in a JSON ``pattern`` (overlong forms) still admit some.

Termination: once the grammar is complete the bitmask allows only the
tokenizer's stop tokens (EOS), and ``is_terminated()`` turns true when one of
them is accepted. The engine feeds the sampled EOS to ``accept_tokens`` like
any other token; rolling it back un-terminates the matcher.
"""
from __future__ import annotations

import copy
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import xgrammar as xgr

from tokenmill import Grammar, GuidedDecoder, StructuredOutputsParams, UnsupportedStructuredOutput

__all__ = ["MAX_SCHEMA_DEPTH", "MAX_STRING_LENGTH", "XGrammarDecoder", "XGrammarMatcher", "apply_token_bitmask"]

MAX_SCHEMA_DEPTH = 32

_ENFORCED = {  # JSON type -> the keywords xgrammar enforces for it
    "string": {"minLength", "maxLength", "pattern", "format"},
    "integer": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"},
    "number": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"},
    "boolean": set(),
    "null": set(),
    "array": {"items", "prefixItems", "minItems", "maxItems", "unevaluatedItems"},
    "object": {"properties", "required", "additionalProperties", "minProperties", "maxProperties",
               "unevaluatedProperties"},
}
_APPLIES_TO = {kw: {t for t, kws in _ENFORCED.items() if kw in kws} for kws in _ENFORCED.values() for kw in kws}
_APPLIES_TO["multipleOf"] = {"integer", "number"}
_UNSUPPORTED = frozenset({"not", "if", "then", "else", "dependentSchemas", "dependentRequired", "dependencies",
                          "patternProperties", "propertyNames", "uniqueItems", "contains", "minContains",
                          "maxContains", "additionalItems", "$dynamicRef", "$dynamicAnchor", "$recursiveRef",
                          "$recursiveAnchor", "contentEncoding", "contentMediaType", "contentSchema"})
_COMBINATORS = ("$ref", "anyOf", "oneOf", "allOf", "const", "enum")
_FORMATS = frozenset({"date", "date-time", "duration", "email", "hostname", "ipv6", "time", "uri", "uri-reference",
                      "uri-template", "uuid"})  # not: ipv4 (leading zeros), json-pointer (raw control chars)
# Inside a JSON string xgrammar 0.2.8 lets raw quotes and control characters through a counted
# repetition above 128, and through its own minLength/maxLength rule at any length. Lengths are
# therefore rewritten as patterns built from repetitions of at most _MAX_REPEAT.
_MAX_REPEAT = 128
MAX_STRING_LENGTH = _MAX_REPEAT * _MAX_REPEAT
_COUNTED_REPEAT = re.compile(r"\{(\d+)(?:,(\d*))?\}")
_REGEX_LETTER_ESCAPES = frozenset("dDwWsSnrtfvaexucbBpPk")  # the rest match the bare letter in xgrammar
# xgrammar's "any character" (``.``, negated classes, free JSON strings) includes invalid UTF-8: the
# surrogates U+D800..U+DFFF and, in a JSON ``pattern``, overlong encodings (they detokenize as U+FFFD).
# Explicit positive ranges are exact, so ``.`` becomes one; negated classes get the surrogates excluded.
_SURROGATES = r"\ud800-\udfff"
# (U+10FFFF is written as itself: xgrammar's regex parser warns on a ``\U`` escape)
_REGEX_DOT = r"[\x00-\x09\x0b-\ud7ff\ue000-" + "\U0010ffff]"  # Python re's ``.``: all but a newline
_JSON_CHAR = r"[\x20\x21\x23-\x5b\x5d-\ud7ff\ue000-" + "\U0010ffff]"  # what a JSON string holds unescaped


def _xgrammar_message(exc: Exception) -> str:
    """xgrammar's own message: the last line, without its log prefix ("[12:00:00] file.cc:83: ")."""
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", line)


def _reject(message: str) -> UnsupportedStructuredOutput:
    return UnsupportedStructuredOutput(f"structured_outputs (xgrammar, no fallback): {message}")


# ---------------------------------------------------------------- regex


def _checked_regex(pattern: str, where: str, in_json: bool = False) -> str:
    """``pattern`` as xgrammar should see it, or a rejection of what its regex
    converter would ignore (and, in a JSON ``pattern``, counted repetitions it
    gets wrong). The result's ``.`` matches no newline (as in Python ``re``) and
    neither ``.`` nor a negated class matches a surrogate (see _SURROGATES)."""
    if not isinstance(pattern, str):
        raise _reject(f"{where} must be a string, got {type(pattern).__name__}")
    out, i, negated_class = [], 0, None  # negated_class: None outside a character class
    while i < len(pattern):
        c, step = pattern[i], 1
        if c == "\\":
            escaped = pattern[i + 1:i + 2]
            if escaped.isalpha() and escaped not in _REGEX_LETTER_ESCAPES:
                raise _reject(f"regex escape '\\{escaped}' in {where} is not supported")
            c, step = pattern[i:i + 2], 2
        elif negated_class is not None:
            if c == "]":
                c, negated_class = (_SURROGATES if negated_class else "") + "]", None
        elif c == "[":
            negated_class = pattern.startswith("[^", i)
            if negated_class:
                c, step = "[^", 2
            if pattern.startswith("]", i + step):
                raise _reject(f"a character class in {where} starts with ']'; escape it as '\\]'")
        elif pattern.startswith(("(?=", "(?!", "(?<=", "(?<!"), i):
            raise _reject(f"regex lookaround assertions (in {where}) are not supported")
        elif (c == "^" and i != 0) or (c == "$" and i != len(pattern) - 1):
            raise _reject(f"regex anchor '{c}' must be at the start/end of {where}, got {pattern!r}")
        elif c == ".":
            c = _JSON_CHAR if in_json else _REGEX_DOT
        elif c == "{" and in_json and (counted := _COUNTED_REPEAT.match(pattern, i)):
            if max(int(n) for n in counted.groups() if n) > _MAX_REPEAT:
                raise _reject(f"counted repetition {counted.group()} in {where} exceeds {_MAX_REPEAT}, "
                              "which xgrammar does not enforce correctly inside JSON strings")
        out.append(c)
        i += step
    return "".join(out)


# ---------------------------------------------------------------- JSON schema


def _exactly(n: int) -> str:
    chunks, rest = divmod(n, _MAX_REPEAT)
    return (f"(?:{_JSON_CHAR}{{{_MAX_REPEAT}}}){{{chunks}}}" if chunks else "") + (f"{_JSON_CHAR}{{{rest}}}" if rest else "")


def _at_most(n: int) -> str:
    if n <= _MAX_REPEAT:
        return f"{_JSON_CHAR}{{0,{n}}}"
    chunks, rest = divmod(n, _MAX_REPEAT)  # lengths below chunks * 128, or from there up to n
    return (f"(?:(?:{_JSON_CHAR}{{{_MAX_REPEAT}}}){{0,{chunks - 1}}}{_JSON_CHAR}{{0,{_MAX_REPEAT - 1}}}"
            f"|(?:{_JSON_CHAR}{{{_MAX_REPEAT}}}){{{chunks}}}{_JSON_CHAR}{{0,{rest}}})")


def _length_pattern(min_length: int, max_length: int | None) -> str:
    """A pattern matching exactly the strings of min_length..max_length code points."""
    tail = f"{_JSON_CHAR}*" if max_length is None else _at_most(max_length - min_length)
    return f"^{_exactly(min_length)}{tail}$"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _json_equal(a: Any, b: Any) -> bool:
    """Equality of JSON values (1 == 1.0, but true != 1)."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_json_equal, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if _is_number(a) and _is_number(b):
        return a == b
    return type(a) is type(b) and a == b


def _has_type(value: Any, type_: str) -> bool:
    if type_ == "integer":
        return _is_number(value) and (isinstance(value, int) or value.is_integer())
    if type_ == "number":
        return _is_number(value)
    python_type = {"null": type(None), "boolean": bool, "string": str, "array": list, "object": dict}[type_]
    return isinstance(value, python_type)


def _types_overlap(a: set[str], b: set[str]) -> bool:
    numeric = {"integer", "number"}
    return bool(a & b or a & numeric and b & numeric)


class _SchemaChecker:
    """Walks a schema (following local ``$ref``s once) and rejects what xgrammar would not enforce."""

    def __init__(self, root: Any) -> None:
        self.root = root
        self.visited: set[int] = set()

    def resolve(self, ref: Any, path: str) -> Any:
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise _reject(f"$ref {ref!r} at {path}: only local references ('#' or '#/...') are supported")
        node = self.root
        for token in ref[2:].split("/") if ref != "#" else ():
            token = token.replace("~1", "/").replace("~0", "~")
            if isinstance(node, list) and token.isdigit() and int(token) < len(node):
                node = node[int(token)]
            elif isinstance(node, dict) and token in node:
                node = node[token]
            else:
                raise _reject(f"$ref {ref!r} at {path} does not resolve")
        return node

    def check(self, node: Any, path: str = "#", depth: int = 1) -> None:
        if depth > MAX_SCHEMA_DEPTH:
            raise _reject(f"JSON schema is nested deeper than the limit of {MAX_SCHEMA_DEPTH} levels (at {path})")
        if isinstance(node, bool):
            return
        if not isinstance(node, dict):
            raise _reject(f"the schema at {path} must be a JSON object or boolean, got {type(node).__name__}")
        unsupported = sorted(k for k in node.keys() & _UNSUPPORTED if not (k == "uniqueItems" and node[k] is False))
        if unsupported:
            raise _reject(f"JSON schema keyword(s) {unsupported} at {path} are not enforced by xgrammar")
        for key, shape in (("properties", dict), ("required", list), ("prefixItems", list)):
            if key in node and not isinstance(node[key], shape):
                raise _reject(f"\"{key}\" at {path} must be a JSON {'object' if shape is dict else 'array'}")
        combinators = [k for k in _COMBINATORS if k in node]
        if combinators:
            return self._check_combinator(node, combinators, path, depth)
        types = self._types(node, path)
        for key in sorted(node.keys() & _APPLIES_TO.keys()):
            if not types:
                raise _reject(f"keyword '{key}' at {path} needs an explicit \"type\" (xgrammar ignores it otherwise)")
            ignored = (_APPLIES_TO[key] & types) - {t for t in types if key in _ENFORCED[t]}
            if ignored:
                raise _reject(f"keyword '{key}' at {path} is not enforced for type {sorted(ignored)}")
        if "string" in types:
            self._check_string(node, path)
        elif "format" in node:
            raise _reject(f"format {node['format']!r} at {path}: only string formats are enforced")
        if "multipleOf" in node and not _has_type(node["multipleOf"], "integer"):
            raise _reject(f"multipleOf at {path} must be a whole number, got {node['multipleOf']!r}")
        properties = node.get("properties", {})
        missing = [k for k in node.get("required", ()) if not isinstance(k, str) or k not in properties]
        if missing:
            raise _reject(f"required {missing} at {path} not declared in \"properties\" (xgrammar ignores them)")
        if isinstance(node.get("items"), list):
            raise _reject(f"\"items\" at {path} is a list (the old tuple form); use \"prefixItems\"")
        for key in ("additionalProperties", "unevaluatedProperties", "items", "unevaluatedItems"):
            if key in node:
                self.check(node[key], f"{path}/{key}", depth + 1)
        for name, sub in properties.items():
            self.check(sub, f"{path}/properties/{name}", depth + 1)
        for i, sub in enumerate(node.get("prefixItems", ())):
            self.check(sub, f"{path}/prefixItems/{i}", depth + 1)

    def _types(self, node: dict, path: str) -> set[str]:
        type_ = node.get("type")
        if type_ is None:
            if "properties" in node:
                return {"object"}
            return {"array"} if "items" in node or "prefixItems" in node else set()
        types = [type_] if isinstance(type_, str) else type_
        if not isinstance(types, list) or not types or not all(t in _ENFORCED for t in types):
            raise _reject(f"\"type\" at {path} must be one of {sorted(_ENFORCED)} or a list of them, got {type_!r}")
        return set(types)

    def _check_string(self, node: dict, path: str) -> None:
        """Also rewrites minLength/maxLength into ``pattern`` (see _MAX_REPEAT)."""
        lengths = node.keys() & {"minLength", "maxLength"}
        for key in ("pattern", "format"):
            if key in node and lengths:
                raise _reject(f"{key} combined with {sorted(lengths)} at {path}: xgrammar drops the lengths")
        if "format" in node and "pattern" in node:
            raise _reject(f"format combined with pattern at {path}: xgrammar drops the pattern")
        if "format" in node and node["format"] not in _FORMATS:
            raise _reject(f"format {node['format']!r} at {path} is not enforced; supported: {sorted(_FORMATS)}")
        if "pattern" in node:
            node["pattern"] = _checked_regex(node["pattern"], f"the pattern at {path}", in_json=True)
        if lengths:
            low, high = node.pop("minLength", 0), node.pop("maxLength", None)
            for value in (low, high):
                if value is not None and not (type(value) is int and 0 <= value <= MAX_STRING_LENGTH):
                    raise _reject(f"minLength/maxLength at {path} must be integers in 0..{MAX_STRING_LENGTH}, "
                                  f"got {value!r}")
            if high is not None and high < low:
                raise _reject(f"maxLength {high} < minLength {low} at {path}: no string fits")
            node["pattern"] = _length_pattern(low, high)

    def _check_combinator(self, node: dict, combinators: list[str], path: str, depth: int) -> None:
        kind = combinators[0]
        if len(combinators) > 1 and combinators != ["const", "enum"]:
            raise _reject(f"{combinators} together at {path}: xgrammar honours only '{kind}'")
        siblings = sorted(k for k in node if k in _APPLIES_TO or k == "type" and kind not in ("const", "enum"))
        if siblings:
            raise _reject(f"{siblings} next to '{kind}' at {path} are ignored by xgrammar; "
                          f"move them into the subschema(s)")
        if kind == "$ref":
            target = self.resolve(node["$ref"], path)
            if id(target) not in self.visited:
                self.visited.add(id(target))
                self.check(target, node["$ref"], depth + 1)
        elif kind in ("const", "enum"):
            enum = node.get("enum", [node.get("const")])
            if not isinstance(enum, list) or not enum:
                raise _reject(f"enum at {path} must be a non-empty list")
            if "const" in node and not any(_json_equal(node["const"], v) for v in enum):
                raise _reject(f"const at {path} is not one of its enum values")
            values = [node["const"]] if "const" in node else enum
            types = self._types(node, path) if "type" in node else None
            for value in values if types else ():
                if not any(_has_type(value, t) for t in types):
                    raise _reject(f"{kind} value {value!r} at {path} does not have type {sorted(types)}")
        else:
            arms = node[kind]
            if not isinstance(arms, list) or not arms:
                raise _reject(f"{kind} at {path} must be a non-empty list of schemas")
            if kind == "allOf" and len(arms) > 1:
                raise _reject(f"allOf with {len(arms)} subschemas at {path} is not merged exactly by xgrammar")
            for i, arm in enumerate(arms):
                self.check(arm, f"{path}/{kind}/{i}", depth + 1)
            if kind == "oneOf" and not self._pairwise_disjoint(arms):
                raise _reject(f"oneOf at {path}: xgrammar matches it as anyOf, and its alternatives are not "
                              f"provably disjoint (by type, by value or by a required const property)")

    # A oneOf is exact under anyOf matching iff no value satisfies two alternatives.

    def _describe(self, arm: Any) -> tuple[set[str] | None, list | None, dict[str, list]]:
        """(types, finite values, required const properties) of an alternative, None if unknown."""
        for _ in range(MAX_SCHEMA_DEPTH):
            if not (isinstance(arm, dict) and "$ref" in arm):
                break
            arm = self.resolve(arm["$ref"], "oneOf")
        if not isinstance(arm, dict) or arm.keys() & {"anyOf", "oneOf", "allOf", "$ref"}:
            return None, None, {}
        if "const" in arm or "enum" in arm:
            return None, [arm["const"]] if "const" in arm else arm["enum"], {}
        types = self._types(arm, "oneOf") or None
        tags = {}
        for key in arm.get("required", ()):
            prop = arm.get("properties", {}).get(key)
            if isinstance(prop, dict) and ("const" in prop or "enum" in prop):
                tags[key] = [prop["const"]] if "const" in prop else prop["enum"]
        return types, None, tags

    def _pairwise_disjoint(self, arms: list) -> bool:
        described = [self._describe(arm) for arm in arms]
        return all(self._disjoint(a, b) for i, a in enumerate(described) for b in described[i + 1:])

    @staticmethod
    def _disjoint(a: tuple, b: tuple) -> bool:
        (types_a, values_a, tags_a), (types_b, values_b, tags_b) = a, b
        if any(not any(_json_equal(x, y) for x in tags_a[k] for y in tags_b[k]) for k in tags_a.keys() & tags_b.keys()):
            return True
        if values_a is not None and values_b is not None:
            return not any(_json_equal(x, y) for x in values_a for y in values_b)
        if values_a is not None and types_b or values_b is not None and types_a:
            values, types = (values_a, types_b) if values_a is not None else (values_b, types_a)
            return not any(_has_type(v, t) for v in values for t in types)
        return bool(types_a and types_b) and not _types_overlap(types_a, types_b)


def _schema_source(schema: str | dict | bool) -> str:
    """The checked schema as JSON text."""
    if isinstance(schema, str):
        def no_constant(name: str) -> Any:
            raise ValueError(f"{name} is not JSON")
        try:
            schema = json.loads(schema, parse_constant=no_constant)
        except ValueError as exc:
            raise _reject(f"json is not a valid JSON document: {exc}") from None
    if not isinstance(schema, (dict, bool)):
        raise _reject(f"a JSON schema must be a JSON object or boolean, got {type(schema).__name__}")
    schema = copy.deepcopy(schema)  # the checker rewrites string lengths in place
    _SchemaChecker(schema).check(schema)
    try:
        return json.dumps(schema, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise _reject(f"the schema is not JSON: {exc}") from None


# ---------------------------------------------------------------- choice


def _ebnf_literal(text: str) -> str:
    """``text`` as an EBNF sequence of string literals. A character that needs escaping is a literal of its
    own: xgrammar reads the hex digits of ``\\x`` greedily, so ``"\\x22a"`` would be U+022A, not ``"a``."""
    parts: list[str] = []
    plain = ""
    for c in text:
        if ord(c) < 0x20 or c in '"\\\x7f':
            if plain:
                parts.append(f'"{plain}"')
                plain = ""
            parts.append(f'"\\x{ord(c):02x}"')
        else:
            plain += c
    if plain:
        parts.append(f'"{plain}"')
    return "(" + " ".join(parts) + ")"


def _choice_grammar(choices: list[str]) -> str:
    if not choices:
        raise _reject("choice must list at least one string")
    if "" in choices:
        raise _reject(f"choice strings must be non-empty, got an empty string at index {choices.index('')}")
    return "root ::= " + " | ".join(_ebnf_literal(c) for c in dict.fromkeys(choices))


# ---------------------------------------------------------------- the component


class XGrammarMatcher(Grammar):
    """One request's matcher. Rollback depth is unlimited in xgrammar 0.2.8
    (its ``max_rollback_tokens`` is deprecated and ignored), so any number of
    speculative tokens can be undone."""

    def __init__(self, compiled: xgr.CompiledGrammar) -> None:
        self._matcher = xgr.GrammarMatcher(compiled)
        self._num_accepted = 0

    def accept_tokens(self, token_ids: Sequence[int]) -> bool:
        for token_id in token_ids:
            if self._matcher.is_terminated() or not self._matcher.accept_token(int(token_id)):
                return False
            self._num_accepted += 1
        return True

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """``bitmask``: CPU int32 [rows, ceil(vocab/32)]. After termination only the stop tokens stay allowed."""
        if not self._matcher.is_terminated():
            self._matcher.fill_next_token_bitmask(bitmask, row)
            return
        bitmask[row].zero_()
        for token_id in self._matcher.stop_token_ids:
            bit = 1 << token_id % 32
            bitmask[row, token_id // 32] |= bit - (1 << 32) if bit >= 1 << 31 else bit  # int32 words

    def rollback(self, num_tokens: int) -> None:
        if not 0 <= num_tokens <= self._num_accepted:
            raise ValueError(f"rollback({num_tokens}): must be between 0 and the {self._num_accepted} "
                             "accepted tokens")
        if num_tokens:
            self._matcher.rollback(num_tokens)
            self._num_accepted -= num_tokens

    def is_terminated(self) -> bool:
        return self._matcher.is_terminated()


class XGrammarDecoder(GuidedDecoder):
    """xgrammar, no fallback: a spec is enforced exactly or rejected at compile time.

    Compiled grammars are cached (LRU, ``max_cached_grammars`` entries) by
    ``spec.cache_key()``; ``compile`` may be called from several threads.
    """

    name = "xgrammar"
    modes = ("json", "regex", "choice", "grammar", "json_object")
    max_cached_grammars = 512

    def __init__(self, tokenizer: Any, vocab_size: int, *, options: Any = None) -> None:
        super().__init__(tokenizer, vocab_size, options=options)
        self.tokenizer_info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self._compiler = xgr.GrammarCompiler(self.tokenizer_info, cache_enabled=False)
        self._cache: OrderedDict[tuple[str, str], xgr.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, spec: StructuredOutputsParams) -> XGrammarMatcher:
        return XGrammarMatcher(self.compiled_grammar(spec))

    def compiled_grammar(self, spec: StructuredOutputsParams) -> xgr.CompiledGrammar:
        """The shared compiled grammar of ``spec`` (validated, then compiled once)."""
        key = spec.cache_key()
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        compiled = self._compile(spec)  # outside the lock: compiles of different specs run in parallel
        with self._lock:
            compiled = self._cache.setdefault(key, compiled)
            self._cache.move_to_end(key)
            while len(self._cache) > self.max_cached_grammars:
                self._cache.popitem(last=False)
        return compiled

    def validate(self, spec: StructuredOutputsParams) -> None:
        """The checks and the parse into an xgrammar ``Grammar``, without the tokenizer-bound
        compilation: every rejection ``compile`` makes, at a fraction of its cost."""
        self._grammar(spec)

    def _grammar(self, spec: StructuredOutputsParams) -> xgr.Grammar:
        mode = spec.mode
        if mode == "json":
            build = partial(xgr.Grammar.from_json_schema, _schema_source(spec.json),
                            any_whitespace=True, strict_mode=True)
        elif mode == "regex":
            build = partial(xgr.Grammar.from_regex, _checked_regex(spec.regex, "the regex"))
        elif mode == "choice":
            build = partial(xgr.Grammar.from_ebnf, _choice_grammar(spec.choice))
        elif mode == "grammar":
            if not isinstance(spec.grammar, str):
                raise _reject(f"grammar must be an EBNF string, got {type(spec.grammar).__name__}")
            build = partial(xgr.Grammar.from_ebnf, spec.grammar)
        else:  # JSON mode means a JSON object (as OpenAI's), not any JSON value
            build = partial(xgr.Grammar.from_json_schema, '{"type": "object"}', any_whitespace=True)
        try:
            return build()
        except RuntimeError as exc:
            raise _reject(f"xgrammar cannot compile the {mode} spec: {_xgrammar_message(exc)}") from exc

    def _compile(self, spec: StructuredOutputsParams) -> xgr.CompiledGrammar:
        grammar = self._grammar(spec)
        try:
            return self._compiler.compile_grammar(grammar)
        except RuntimeError as exc:
            raise _reject(f"xgrammar cannot compile the {spec.mode} spec: {_xgrammar_message(exc)}") from exc

    @staticmethod
    def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, indices: list[int] | None = None) -> None:
        apply_token_bitmask(logits, bitmask, indices)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, indices: Sequence[int] | None = None) -> None:
    """Set the disallowed logits to -inf in place (xgrammar's CPU or Triton kernel).

    logits: [rows, vocab] on any device; bitmask: int32 [rows, ceil(vocab/32)]
    (copied to the logits' device when needed); ``indices``: the rows to mask
    (all when None), for batches that mix guided and free requests.
    """
    if bitmask.dtype != torch.int32 or bitmask.shape[-1] != (logits.shape[-1] + 31) // 32:
        raise ValueError(f"bitmask must be int32 [rows, {(logits.shape[-1] + 31) // 32}] for logits "
                         f"{list(logits.shape)}, got {bitmask.dtype} {list(bitmask.shape)}")
    if bitmask.device != logits.device:
        bitmask = bitmask.to(logits.device, non_blocking=True)
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[-1],
                                    indices=None if indices is None else list(indices))
