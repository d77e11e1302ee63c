"""Chain-of-thought synthesis for the activation stage (Retrv-R1, arXiv 2510.02745).

A teacher writes, for one training example, a reasoning trace in the paper's four phases:

1. imagine the ideal target for the query;
2. drop the clear negatives quickly;
3. inspect and verify the hard candidates, each request written as a real
   ``<inspection-index-start><cand_i><inspection-index-end>`` (at training time the
   candidate's full tokens are spliced in right after it, exactly as at inference);
4. answer: ``</think><answer><cand_i></answer>``.

Only traces whose final answer is the labelled positive (and that parse cleanly) are kept.

Teachers:

* :class:`HFTeacher`: any local ``transformers`` causal LM (no Retrv-R1 parts), prompted
  with the candidates' text (images appear as ``[image]`` markers);
* :class:`OpenAITeacher`: an OpenAI-compatible ``/chat/completions`` endpoint over plain
  HTTP (``urllib``), with exponential-backoff retries (tenacity) and a rate limit;
* :class:`ProgrammaticTeacher`: **a fallback, not the paper's method**: composes the four
  phases from the label and the first-stage scores (no language model). Useful to
  bootstrap the format, for tests, and when no teacher model is available.

:func:`synthesize_cot` caches every raw teacher output in an on-disk JSONL keyed by
example id (one fsynced line per call), so an interrupted run resumes where it stopped and
never pays for the same call twice.
"""

from __future__ import annotations

import http.client
import hashlib
import json
import logging
import os
import random
import re
import threading
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence

from retrv_r1_plugin.tokens import THINK_END

from .examples import TrainingExample
from .data.formats import DataFormatError, read_jsonl, write_jsonl

logger = logging.getLogger(__name__)

__all__ = [
    "TEACHER_SYSTEM_PROMPT",
    "CoTTrace",
    "Teacher",
    "ProgrammaticTeacher",
    "HFTeacher",
    "OpenAITeacher",
    "TeacherError",
    "RateLimiter",
    "teacher_messages",
    "parse_teacher_output",
    "synthesize_cot",
    "SynthesisStats",
    "write_traces",
    "read_traces",
]

TEACHER_SYSTEM_PROMPT = (
    "You rank retrieval candidates for a query and explain how, for a student model that sees each "
    "candidate only as a compressed summary. Candidates are labelled <cand_1>, <cand_2>, ...; refer to "
    "them only by these labels. Reason in four phases:\n"
    "1. Imagine: describe the ideal target for the query in one or two sentences.\n"
    "2. Drop: name the candidates that clearly do not match, in one line.\n"
    "3. Inspect: for each hard candidate, request a detailed look by writing exactly "
    "<inspection-index-start><cand_N><inspection-index-end>, then verify it against the ideal target in one "
    "sentence. Inspect only the candidates you cannot decide without the details.\n"
    "4. Answer: end with </think><answer><cand_N></answer> naming the single best candidate.\n"
    "Write no other tags."
)

_CAND = r"(?:<cand_(\d+)>|(\d+))"
_INSPECT = re.compile(r"<inspection-index-start>\s*" + _CAND + r"\s*<inspection-index-end>")
_ANSWER = re.compile(r"<answer>\s*" + _CAND + r"\s*(?:</answer>)?")
_LABEL = re.compile(r"<cand_(\d+)>")
_OTHER_TAG = re.compile(r"</?(?:think|answer|inspected)>|<\|[^>]*\|>")
#: anything shaped like a tag or special token (``<answer>``, ``<cand_3>``, ``<|im_end|>``, ``</s>``)
_TAGLIKE = re.compile(r"<(/?[^\s<>]{1,64})>")


def untrusted_for_teacher(text: str) -> str:
    """Query or candidate text as a teacher may see it: one line, tag-like sequences escaped.

    The text is untrusted: a literal ``<cand_3>``, ``<answer>`` or
    ``<inspection-index-start>`` in it, echoed by the teacher into its reasoning, would
    become a real structural token of the SFT target (and a ``<|im_end|>`` would end the
    teacher's own chat turn); a newline would start a fake ``<cand_N>:`` line of the prompt.
    Escaped as ``&lt;answer&gt;``, an echo stays ordinary text.
    """
    return _TAGLIKE.sub(r"&lt;\1&gt;", " ".join(text.split()))


class TeacherError(RuntimeError):
    """A teacher call failed for good (after its retries)."""


@dataclass
class CoTTrace:
    """A kept reasoning trace: the example, the reasoning (ending with ``</think>``), the answer."""

    example: TrainingExample
    reasoning: str
    answer: int
    inspected: list[int] = field(default_factory=list)
    teacher: str = ""

    def __post_init__(self) -> None:
        # The contract every trace producer must keep: reasoning is empty (direct mode) or
        # closes its own thinking. A trace without ``</think>`` trains a model that never
        # ends its reasoning, and GRPO's format reward can then never be earned.
        if self.reasoning and not self.reasoning.rstrip().endswith(THINK_END):
            raise ValueError(f"trace for {self.example.id!r}: reasoning must be empty or end with {THINK_END!r}, got ...{self.reasoning[-40:]!r}")
        n = len(self.example.candidates)
        if not 0 <= self.answer < n:
            raise ValueError(f"trace for {self.example.id!r}: answer index {self.answer} is outside the {n} candidates")
        bad = [i for i in self.inspected if not 0 <= i < n]
        if bad:
            raise ValueError(f"trace for {self.example.id!r}: inspected indices {bad} are outside the {n} candidates")

    def to_dict(self) -> dict[str, Any]:
        return {"example": self.example.to_dict(), "reasoning": self.reasoning, "answer": self.answer, "inspected": self.inspected, "teacher": self.teacher}

    def permuted(self, order: Sequence[int]) -> "CoTTrace":
        """The trace with candidates in ``order`` (``order[new] = old``): the example, the
        answer, the inspected indices and every ``<cand_N>`` label in the reasoning follow."""
        example = self.example.permuted(order)
        new_of_old = {old: new for new, old in enumerate(order)}

        def relabel(m: re.Match) -> str:
            old = int(m.group(1)) - 1
            return f"<cand_{new_of_old[old] + 1}>" if old in new_of_old else m.group(0)

        return CoTTrace(
            example=example,
            reasoning=_LABEL.sub(relabel, self.reasoning),
            answer=new_of_old[self.answer],
            inspected=[new_of_old[i] for i in self.inspected],
            teacher=self.teacher,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CoTTrace":
        return cls(
            example=TrainingExample.from_dict(data["example"]),
            reasoning=data["reasoning"],
            answer=int(data["answer"]),
            inspected=[int(i) for i in data.get("inspected", [])],
            teacher=data.get("teacher", ""),
        )


def write_traces(path: str | os.PathLike, traces: Iterable[CoTTrace]) -> int:
    """Write traces as JSON lines (atomically)."""
    return write_jsonl(path, (t.to_dict() for t in traces))


def read_traces(path: str | os.PathLike) -> list[CoTTrace]:
    """Read traces written by :func:`write_traces`; a broken one names its file and line."""
    traces = []
    for line_no, obj in read_jsonl(path):
        if "example" not in obj and "candidates" in obj and "query_text" in obj:
            raise DataFormatError(
                f"{path}:{line_no}: this is a training example (from `data examples`), not a CoT trace: sft trains on "
                f"traces, made by `python -m training.cli data cot --examples {path} --out TRACES.jsonl`"
            )
        try:
            traces.append(CoTTrace.from_dict(obj))
        except KeyError as exc:
            raise DataFormatError(f"{path}:{line_no}: not a valid trace: missing field {exc}") from exc
        except (TypeError, ValueError) as exc:
            raise DataFormatError(f"{path}:{line_no}: not a valid trace: {exc}") from exc
    return traces


# --------------------------------------------------------------------------- prompts & parsing


def teacher_messages(example: TrainingExample, max_chars: int = 600) -> list[dict[str, str]]:
    """Chat messages asking a teacher for a four-phase trace of ``example``."""
    lines = [f"Query: {untrusted_for_teacher(example.query_text or '')}{' [image]' if example.query_image else ''}".rstrip(), "Candidates:"]
    for i, c in enumerate(example.candidates):
        text = untrusted_for_teacher(c.text or "")[:max_chars]
        lines.append(f"<cand_{i + 1}>: {'[image] ' if c.image else ''}{text}")
    lines.append("Think step by step in the four phases, then answer.")
    return [{"role": "system", "content": TEACHER_SYSTEM_PROMPT}, {"role": "user", "content": "\n".join(lines)}]


def _num(m: re.Match) -> int:
    return int(m.group(1) or m.group(2))


def parse_teacher_output(text: str, num_candidates: int) -> tuple[str, int | None, list[int], list[str]]:
    """Canonicalise a teacher's output: ``(reasoning, answer, inspected, problems)``.

    ``reasoning`` runs from after an optional ``<think>`` up to and including one final
    ``</think>``; inspection requests become ``<inspection-index-start><cand_N><inspection-index-end>``.
    ``answer`` and ``inspected`` are 0-based. A non-empty ``problems`` means: reject.
    """
    problems: list[str] = []
    body = text.split("<think>", 1)[1] if "<think>" in text else text
    answers = list(_ANSWER.finditer(body))
    if not answers:
        return "", None, [], ["no <answer>"]
    last = answers[-1]
    answer = _num(last) - 1
    tail = body[last.end():]
    if not last.group(0).endswith("</answer>") and re.search(r"<cand_\d+>|\d", tail.split("</answer>", 1)[0]):
        problems.append("several candidates in <answer>")  # "<answer><cand_2> or <cand_3>": no single choice
    reasoning = body[: last.start()].rstrip()
    if reasoning.endswith("</think>"):
        reasoning = reasoning[: -len("</think>")].rstrip()
    inspected: list[int] = []

    def canon(m: re.Match) -> str:
        idx = _num(m) - 1
        if not 0 <= idx < num_candidates:
            problems.append(f"inspection of candidate {idx + 1}, beyond K={num_candidates}")
        elif idx in inspected:
            problems.append(f"candidate {idx + 1} inspected twice")
        inspected.append(idx)
        return f"<inspection-index-start><cand_{idx + 1}><inspection-index-end>"

    reasoning = _INSPECT.sub(canon, reasoning)
    # "<cand_02>" names candidate 2 but is no token of the model: write every label canonically
    reasoning = _LABEL.sub(lambda m: f"<cand_{int(m.group(1))}>", reasoning)
    if "<inspection-index-start>" in _INSPECT.sub("", reasoning) or "<inspection-index-end>" in _INSPECT.sub("", reasoning):
        problems.append("malformed inspection request")
    if _OTHER_TAG.search(reasoning):
        problems.append("stray tag in the reasoning")
    if any(not 1 <= int(n) <= num_candidates for n in _LABEL.findall(reasoning)):
        problems.append("reasoning names a candidate beyond K")
    if not reasoning.strip():
        problems.append("empty reasoning")
    if not 0 <= answer < num_candidates:
        problems.append(f"answer {answer + 1} is not a candidate")
    return reasoning + "</think>", answer, [i for i in inspected if 0 <= i < num_candidates], problems


# --------------------------------------------------------------------------- teachers


class Teacher(Protocol):
    name: str

    def generate(self, example: TrainingExample) -> str:
        """The teacher's raw completion for one example."""


class ProgrammaticTeacher:
    """Fallback writer (not the paper's method): the four phases from labels and first-stage scores.

    The hard candidates are the ``n_hard`` best by first-stage score plus the positive;
    the rest are dropped as clear negatives. Between 0 and ``max_inspections`` hard
    candidates are inspected (negatives first, so the positive is verified last); with
    probability ``skip_positive_inspection`` the positive is judged without inspection, so
    the set holds traces with different inspection counts. Choices are seeded by the example id.
    """

    name = "programmatic"

    def __init__(self, *, n_hard: int = 3, max_inspections: int = 2, skip_positive_inspection: float = 0.3, seed: int = 0) -> None:
        self.n_hard, self.max_inspections = n_hard, max_inspections
        self.skip_positive_inspection, self.seed = skip_positive_inspection, seed

    def cache_identity(self, example: TrainingExample) -> dict[str, Any]:
        """Everything besides the example that decides the output (part of the cache key)."""
        return {"name": self.name, "n_hard": self.n_hard, "max_inspections": self.max_inspections,
                "skip_positive_inspection": self.skip_positive_inspection, "seed": self.seed}

    def generate(self, example: TrainingExample) -> str:
        rng = random.Random(self.seed * 1_000_003 + zlib.crc32(example.id.encode()))
        k, pos = example.k, example.positive
        order = sorted(range(k), key=lambda i: (-(example.candidates[i].score if example.candidates[i].score is not None else -i), i))
        hard = [i for i in order if i != pos][: max(0, self.n_hard - 1)]
        hard = sorted(hard + [pos])
        clear = [i for i in range(k) if i not in hard]
        lab = lambda i: f"<cand_{i + 1}>"  # noqa: E731
        query = untrusted_for_teacher(example.query_text or "").rstrip("?.!")
        ideal = f"what the query asks: {query}" if query else "an item like the query image"
        parts = [f"Ideal: {ideal}.", f"Drop: {', '.join(map(lab, clear)) if clear else 'none'}.", f"Hard: {', '.join(map(lab, hard))}."]
        negs = [i for i in hard if i != pos]
        rng.shuffle(negs)
        n_inspect = rng.randint(0, min(self.max_inspections, len(hard)))
        inspect_pos = n_inspect > 0 and rng.random() >= self.skip_positive_inspection
        budget = n_inspect - int(inspect_pos)
        for i in negs[: max(0, budget)]:
            parts.append(f"<inspection-index-start>{lab(i)}<inspection-index-end> {lab(i)} does not match.")
        for i in negs[max(0, budget):]:
            parts.append(f"{lab(i)} is weaker.")
        if inspect_pos:
            parts.append(f"<inspection-index-start>{lab(pos)}<inspection-index-end> {lab(pos)} matches.")
        else:
            parts.append(f"{lab(pos)} clearly matches.")
        return " ".join(parts) + f"</think><answer>{lab(pos)}</answer>"


class HFTeacher:
    """A local Hugging Face causal LM as teacher (greedy unless ``temperature > 0``)."""

    def __init__(self, model: Any, tokenizer: Any = None, *, max_new_tokens: int = 512, temperature: float = 0.0, gguf_file: str | None = None, name: str | None = None, seed: int = 0) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.gguf_file = gguf_file
        if isinstance(model, (str, os.PathLike)):
            extra = {"gguf_file": gguf_file} if gguf_file else {}
            self.name = name or f"hf:{Path(model).name}"
            self.source = str(Path(model).resolve()) if Path(model).exists() else str(model)
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(model, **extra)
            model = AutoModelForCausalLM.from_pretrained(model, **extra)
        else:
            self.name = name or f"hf:{type(model).__name__}"
            self.source = f"{type(model).__name__}:{getattr(getattr(model, 'config', None), '_name_or_path', '')}"
        if tokenizer is None:
            raise ValueError("give the tokenizer with a loaded model")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_new_tokens, self.temperature, self.seed = max_new_tokens, temperature, seed

    def cache_identity(self, example: TrainingExample) -> dict[str, Any]:
        """The model, the generation settings and the prompt (part of the cache key)."""
        return {"name": self.name, "model": self.source, "gguf_file": self.gguf_file, "max_new_tokens": self.max_new_tokens,
                "temperature": self.temperature, "seed": self.seed, "messages": teacher_messages(example)}

    def generate(self, example: TrainingExample) -> str:
        import torch

        messages = teacher_messages(example)
        if getattr(self.tokenizer, "chat_template", None):
            try:
                ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
            except Exception:  # templates without a system role
                merged = [{"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}]
                ids = self.tokenizer.apply_chat_template(merged, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
        else:
            ids = self.tokenizer("\n\n".join(m["content"] for m in messages) + "\n", return_tensors="pt")["input_ids"]
        ids = ids.to(self.model.device)
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.temperature > 0}
        if self.temperature > 0:
            torch.manual_seed(self.seed + zlib.crc32(example.id.encode()))
            kwargs.update(temperature=self.temperature, top_k=0, top_p=1.0)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        # generate() fills every setting not given here from the checkpoint's generation_config
        # (repetition_penalty, num_beams, suppress_tokens, min_new_tokens, ...): decode under a
        # clean one that keeps only the checkpoint's stop and special token ids.
        from transformers import GenerationConfig

        saved = getattr(self.model, "generation_config", None)
        keep = {k: getattr(saved, k, None) for k in ("eos_token_id", "bos_token_id", "pad_token_id", "decoder_start_token_id")}
        if keep["eos_token_id"] is None:
            keep["eos_token_id"] = self.tokenizer.eos_token_id
        self.model.generation_config = GenerationConfig(**{k: v for k, v in keep.items() if v is not None})
        try:
            with torch.inference_mode():
                out = self.model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=pad, **kwargs)
        finally:
            self.model.generation_config = saved
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


class RateLimiter:
    """At most ``per_minute`` calls a minute, evenly spaced (thread-safe)."""

    def __init__(self, per_minute: float | None, clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        if per_minute is not None and not 0 <= per_minute < float("inf"):  # also refuses NaN
            raise ValueError(f"requests per minute must be a number >= 0 (0 or None: no limit), got {per_minute}")
        self.interval = 60.0 / per_minute if per_minute else 0.0
        self.clock, self.sleep = clock, sleep
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = self.clock()
            if now < self._next:
                self.sleep(self._next - now)
                now = self._next
            self._next = now + self.interval


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _retry_after(headers: Any) -> float | None:
    """Seconds asked for by a ``Retry-After`` header (delta-seconds or an HTTP date), or ``None``."""
    value = headers.get("Retry-After") if headers is not None else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        import email.utils

        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError, OverflowError):
        return None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Follow no redirect: urllib would re-send the ``Authorization`` header (the API key) to
    whatever host a ``Location`` names, also from https to plain http."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D401 - urllib's hook
        return None  # urllib then raises the 3xx as an HTTPError


_LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def _teacher_image_bytes(path: str, example_id: str, label: str, limit: int) -> bytes:
    """The bytes of an example's image file, sent to the teacher only when it is a regular
    file of at most ``limit`` bytes that decodes as an image: an ``image_path`` of a data set
    (absolute, or with ``..``) must never ship a key file, ``/etc/shadow`` or ``/dev/zero`` to
    the endpoint. Raises :class:`~retrv_r1_plugin.types.ImageLoadError` naming the example."""
    import stat as stat_module

    from retrv_r1_plugin.types import ImageLoadError, load_image

    where = f"example {example_id!r}, image of {label} ({path})"
    try:
        info = os.stat(path)
    except OSError as exc:
        raise ImageLoadError(f"{where}: {exc.strerror or exc}") from exc
    if not stat_module.S_ISREG(info.st_mode):
        raise ImageLoadError(f"{where}: not a regular file; not sent to the teacher")
    if info.st_size > limit:
        raise ImageLoadError(f"{where}: {info.st_size} bytes, above the {limit}-byte limit for images sent to the teacher")
    with open(path, "rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise ImageLoadError(f"{where}: above the {limit}-byte limit for images sent to the teacher")
    try:
        load_image(data)
    except ImageLoadError as exc:
        raise ImageLoadError(f"{where}: not a readable image, so not sent to the teacher ({exc})") from exc
    return data


class OpenAITeacher:
    """An OpenAI-compatible chat endpoint (``POST {base_url}/chat/completions``) as teacher.

    Retries HTTP 408/429/5xx, connection errors, timeouts and malformed replies with
    exponential backoff (``backoff * 2**n`` seconds, capped at ``max_backoff``) up to
    ``max_retries`` attempts, waiting at least what a ``Retry-After`` header asks (at most
    ``max_retry_after`` seconds); other HTTP errors (e.g. 400, 401) fail at once. ``api_key``
    defaults to ``$OPENAI_API_KEY`` (may be empty for local servers).

    Only ``http(s)://`` base URLs are taken; TLS certificates are verified (Python's default
    context). Redirects are not followed (the key would go wherever they point): a 3xx fails
    at once, naming its ``Location``. A reply above ``max_response_bytes`` fails at once. With
    ``send_images``, an image is sent only if it is a regular file of at most
    ``max_image_bytes`` that decodes as an image.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        temperature: float = 0.0,
        max_tokens: int = 1024,
        timeout: float = 120.0,
        max_retries: int = 6,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        max_retry_after: float = 600.0,
        requests_per_minute: float | None = None,
        send_images: bool = False,
        max_response_bytes: int = 16 * 2**20,
        max_image_bytes: int = 20 * 2**20,
    ) -> None:
        import urllib.parse

        parsed = urllib.parse.urlsplit(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"base_url must be an http:// or https:// URL, got {base_url!r}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.name = f"openai:{model}"
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY", "")
        self.temperature, self.max_tokens, self.timeout = temperature, max_tokens, timeout
        self.max_retries, self.backoff, self.max_backoff = max(1, max_retries), backoff, max_backoff
        self.max_retry_after = max_retry_after
        self.limiter = RateLimiter(requests_per_minute)
        self.send_images = send_images
        self.max_response_bytes, self.max_image_bytes = max_response_bytes, max_image_bytes
        self.calls = 0
        self._opener = urllib.request.build_opener(_NoRedirect)
        if self.api_key and parsed.scheme == "http" and (parsed.hostname or "") not in _LOOPBACK_HOSTS:
            logger.warning("the teacher's API key goes unencrypted to %s (plain http); use https", parsed.netloc)

    def cache_identity(self, example: TrainingExample) -> dict[str, Any]:
        """The endpoint, the model, the sampling settings and the prompt (part of the cache key)."""
        return {"name": self.name, "url": self.url, "model": self.model, "temperature": self.temperature, "max_tokens": self.max_tokens,
                "send_images": self.send_images, "messages": teacher_messages(example)}

    def _messages(self, example: TrainingExample) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = teacher_messages(example)
        if self.send_images:
            import base64
            import mimetypes

            parts: list[dict[str, Any]] = [{"type": "text", "text": messages[1]["content"]}]
            for label, path in [("query", example.query_image)] + [(f"<cand_{i + 1}>", c.image) for i, c in enumerate(example.candidates)]:
                if path:
                    mime = mimetypes.guess_type(path)[0] or "image/png"
                    data = base64.b64encode(_teacher_image_bytes(path, example.id, label, self.max_image_bytes)).decode()
                    parts.append({"type": "text", "text": f"Image of {label}:"})
                    parts.append({"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}})
            messages[1] = {"role": "user", "content": parts}
        return messages

    def _error(self, message: str) -> TeacherError:
        """A :class:`TeacherError` whose message never holds the API key (a server may echo it)."""
        return TeacherError(message.replace(self.api_key, "***") if self.api_key else message)

    def _post(self, payload: dict[str, Any]) -> str:
        self.limiter.wait()
        self.calls += 1
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=json.dumps(payload).encode(), headers=headers, method="POST")
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                raw = resp.read(self.max_response_bytes + 1)
        except urllib.error.HTTPError as exc:
            if exc.code in (408, 429) or exc.code >= 500:
                raise _Retryable(f"HTTP {exc.code} from {self.url}", _retry_after(exc.headers)) from exc
            if 300 <= exc.code < 400:
                raise self._error(f"HTTP {exc.code} from {self.url}: a redirect to {exc.headers.get('Location')!r}, "
                                  "not followed (the API key is never sent elsewhere); give the final URL as base_url") from exc
            raise self._error(f"HTTP {exc.code} from {self.url}: {exc.read(200)!r}") from exc
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as exc:
            raise _Retryable(f"cannot reach {self.url}: {exc}") from exc
        if len(raw) > self.max_response_bytes:
            raise self._error(f"reply from {self.url} is larger than max_response_bytes={self.max_response_bytes}")
        body = raw.decode("utf-8", errors="replace")
        try:
            content = json.loads(body)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise _Retryable(f"malformed reply from {self.url}: {body[:200]!r}") from exc
        if not isinstance(content, str):
            raise _Retryable(f"reply without text content from {self.url}")
        return content

    def generate(self, example: TrainingExample) -> str:
        from tenacity import RetryError, Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

        payload = {"model": self.model, "messages": self._messages(example), "temperature": self.temperature, "max_tokens": self.max_tokens}
        backoff = wait_exponential(multiplier=self.backoff, max=self.max_backoff)

        def wait(state) -> float:  # the backoff, or longer where the server says when to come back
            asked = getattr(state.outcome.exception(), "retry_after", None)
            return max(backoff(state), min(asked, self.max_retry_after)) if asked is not None else backoff(state)

        retrying = Retrying(
            stop=stop_after_attempt(self.max_retries),
            wait=wait,
            retry=retry_if_exception_type(_Retryable),
            reraise=False,
        )
        try:
            return retrying(self._post, payload)
        except RetryError as exc:
            raise self._error(f"teacher call for example {example.id!r} failed after {self.max_retries} attempts: {exc.last_attempt.exception()}") from None


# --------------------------------------------------------------------------- synthesis


def _cache_key(example: TrainingExample, teacher: Teacher) -> str:
    """Example id plus a fingerprint of its content (two data sets may reuse the same ids) and
    of the teacher's settings and prompt (``cache_identity``, where the teacher has one): another
    model, endpoint, temperature, token limit, seed or prompt never reuses an output."""
    identity = getattr(teacher, "cache_identity", None)
    blob = {"example": example.to_dict(), "teacher": identity(example) if callable(identity) else teacher.name}
    digest = hashlib.sha1(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{example.id}#{digest}"


@dataclass
class SynthesisStats:
    kept: int = 0
    wrong_answer: int = 0
    unparseable: int = 0
    failed: int = 0
    cached: int = 0
    called: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class _Cache:
    """Append-only JSONL of raw teacher outputs, keyed by (teacher name, :func:`_cache_key`).

    Several synthesis processes may share one cache (e.g. one per shard against the same
    API): appends and the repair of a line torn by a kill hold ``<cache>.lock``, so one
    process never truncates or interleaves with a line another is writing.
    """

    def __init__(self, path: str | os.PathLike | None) -> None:
        from filelock import FileLock

        self.path = Path(path) if path else None
        self.entries: dict[tuple[str, str], str] = {}
        self._lock = FileLock(f"{self.path}.lock") if self.path else None
        if self.path and self.path.is_file():
            with self._lock:
                self._load()

    def _load(self) -> None:
        assert self.path is not None
        data = self.path.read_bytes()  # bytes: a kill mid-line may have cut a UTF-8 character
        end = data.rfind(b"\n") + 1
        if end < len(data):  # the last line has no newline: a write cut by a kill
            if self._parse(data[end:]) is None:
                with open(self.path, "r+b") as fh:  # torn: drop it, so the next line starts on its own
                    fh.truncate(end)
                    os.fsync(fh.fileno())
                data = data[:end]
            else:
                with open(self.path, "ab") as fh:  # complete: only its newline is missing
                    fh.write(b"\n")
                    os.fsync(fh.fileno())
        for line in data.splitlines():
            entry = self._parse(line)
            if entry is not None:
                self.entries[entry[0]] = entry[1]

    @staticmethod
    def _parse(line: bytes) -> tuple[tuple[str, str], str] | None:
        try:
            obj = json.loads(line.decode("utf-8"))
            if isinstance(obj["raw"], str):
                return (obj["teacher"], obj["id"]), obj["raw"]
        except (ValueError, KeyError, TypeError):  # UnicodeDecodeError is a ValueError
            pass
        return None

    def get(self, teacher: str, ex_id: str) -> str | None:
        return self.entries.get((teacher, ex_id))

    def put(self, teacher: str, ex_id: str, raw: str) -> None:
        self.entries[(teacher, ex_id)] = raw
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps({"teacher": teacher, "id": ex_id, "raw": raw}, ensure_ascii=False) + "\n").encode("utf-8")
        assert self._lock is not None
        with self._lock, open(self.path, "ab") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())


def synthesize_cot(
    examples: Sequence[TrainingExample],
    teacher: Teacher,
    out_path: str | os.PathLike | None = None,
    *,
    cache_path: str | os.PathLike | None = None,
    on_error: str = "stop",
    progress: bool = False,
) -> tuple[list[CoTTrace], SynthesisStats]:
    """Ask ``teacher`` for every example; keep the traces whose answer is the positive.

    Raw outputs go to ``cache_path`` as they arrive; a rerun reuses them. A teacher call
    that fails for good (a :class:`TeacherError`, e.g. an endpoint answering HTTP 400 to a
    prompt that is too long) is handled by ``on_error``:

    * ``"stop"`` (default; ``"raise"`` is the older name): the error propagates and the run
      stops (everything before it is cached, so a rerun resumes there);
    * ``"skip"``: the example is left out of the traces, counted in ``stats.failed`` and
      logged with its id and the error; it is **not** cached, so a later run asks again.

    Other exceptions always propagate. Kept traces are written to ``out_path`` if given.
    """
    if on_error == "raise":
        on_error = "stop"
    if on_error not in ("stop", "skip"):
        raise ValueError(f"on_error must be 'stop' or 'skip', got {on_error!r}")
    from tqdm.auto import tqdm

    cache = _Cache(cache_path)
    stats = SynthesisStats()
    kept: list[CoTTrace] = []
    for ex in tqdm(examples, desc=f"CoT ({teacher.name})", disable=not progress):
        key = _cache_key(ex, teacher)
        raw = cache.get(teacher.name, key)
        if raw is None:
            try:
                raw = teacher.generate(ex)
            except TeacherError as exc:
                if on_error == "stop":
                    raise
                logger.warning("teacher failed for good on example %r, skipped (not cached; a rerun asks again): %s", ex.id, exc)
                stats.failed += 1
                continue
            stats.called += 1
            cache.put(teacher.name, key, raw)
        else:
            stats.cached += 1
        reasoning, answer, inspected, problems = parse_teacher_output(raw, ex.k)
        if answer is None or any(not p.startswith("answer ") for p in problems):
            stats.unparseable += 1
            continue
        if answer != ex.positive:  # includes an answer that names no candidate
            stats.wrong_answer += 1
            continue
        kept.append(CoTTrace(example=ex, reasoning=reasoning, answer=answer, inspected=inspected, teacher=teacher.name))
        stats.kept += 1
    if stats.failed:
        logger.warning("%d example(s) skipped after a teacher failure; rerun with the same cache to retry them", stats.failed)
    if out_path is not None:
        write_traces(out_path, kept)
    return kept, stats
