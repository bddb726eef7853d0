"""What looks like a secret: in a text (a file that `submit` would ship) or in a value of a job file.

The rules follow the maintained scanners' (gitleaks' default rules, detect-secrets' plugins): private-key
headers, the key formats of the clouds and services that print a recognisable prefix, passwords in URLs,
and high-entropy values assigned to key-like names. Written here, not vendored; no import beyond `re`, so
`validate` stays light.
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter
from typing import Any

from orchestrator.storage import redact

# (reason, literals, pattern): a match is a secret whatever surrounds it. The pattern runs only where one of
# its literals occurs (a plain substring search): a package's data and code are read at memory speed.
_FORMATS: tuple[tuple[str, tuple[str, ...], re.Pattern[str]], ...] = tuple(
    (reason, literals, re.compile(pattern))
    for reason, literals, pattern in (
        (
            "a private key",
            ("PRIVATE KEY", "PuTTY-User-Key-File"),
            r"-----BEGIN[ A-Z0-9]{0,24} PRIVATE KEY(?: BLOCK)?-----|PuTTY-User-Key-File-\d",
        ),
        (
            "an AWS access key id",
            ("A3T", "AKIA", "ASIA", "ABIA", "ACCA"),
            r"\b(?:A3T[A-Z0-9]|AKIA|ASIA|ABIA|ACCA)[A-Z2-7]{16}\b",
        ),
        ("a GCP service-account key", ("service_account",), r"\"type\"\s*:\s*\"service_account\""),
        ("a Google API key", ("AIza",), r"\bAIza[\w-]{35}\b"),
        (
            "a GitHub token",
            ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
            r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_\w{60,})\b",
        ),
        ("a GitLab token", ("glpat-",), r"\bglpat-[\w-]{20,}\b"),
        ("a Slack token", ("xox",), r"\bxox[abposr]-[A-Za-z0-9-]{10,}"),
        (
            "an OpenAI key",
            ("sk-",),
            r"\bsk-(?:proj-|svcacct-|admin-)?[\w-]{20,}T3BlbkFJ[\w-]{20,}|\bsk-[A-Za-z0-9]{48}\b",
        ),
        ("a Hugging Face token", ("hf_",), r"\bhf_[A-Za-z]{34}\b"),
        ("a Stripe key", ("_live_",), r"\b[rs]k_live_[0-9A-Za-z]{24,}\b"),
        ("a JSON web token", ("eyJ",), r"\beyJ[\w-]{10,}\.eyJ[\w-]{10,}\.[\w-]{10,}"),
        ("a password in a URL", ("://",), r"\b[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@'\"]+:[^/\s@'\"]+@[\w.-]"),
    )
)
# gitleaks' generic-api-key: a key-like name, an assignment, and a value with no spaces; the value counts
# when it is random enough (entropy) and mixes letters and digits (an identifier rarely does). Matched from
# each place a keyword occurs.
_KEYWORDS = ("access", "auth", "api", "credential", "creds", "key", "passwd", "password", "secret", "token")
_ASSIGNED = re.compile(
    r"[\w.-]{0,20}[\s'\"]{0,3}(?:=|:{1,2}=|:|=>)[\s'\"`=]{0,5}([\w.=+/~-]{10,150})(?=['\"\s`;,]|$)", re.MULTILINE
)
MIN_ENTROPY = 3.5  # gitleaks' threshold for its generic rule
# Parts of a job file's key that say its value is a secret, whatever the value looks like.
_SECRET_WORDS = {"password", "passwd", "pwd", "passphrase", "secret", "secrets", "credential", "credentials"}
_SECRET_PAIRS = {("api", "key"), ("access", "key"), ("secret", "key"), ("private", "key"), ("auth", "token")}
_SECRET_WORDS |= {"".join(pair) for pair in _SECRET_PAIRS} | {"accesstoken", "clientsecret"}
# Parts that make a value a secret only when it is random enough (`token: gpt2` is a tokenizer's name).
_KEY_WORDS = {"token", "key", "auth", "apikey", "bearer"}
# The name of a variable that holds the secret is not the secret: `password_env: DB_PASSWORD`, `${TOKEN}`.
_REFERENCE = re.compile(r"\$?\{?[A-Z_][A-Z0-9_]*\}?")
# Nor is where it lies: `password_file: /run/secrets/db`, `secret_url: https://vault/v1/db`.
_PLACE = re.compile(r"(?:/|\./|\.\./|~/|[A-Za-z][A-Za-z0-9+.-]*://)")


def entropy(text: str) -> float:
    """Shannon entropy of a string, bits per character."""
    counts = Counter(text)
    return -sum(n / len(text) * math.log2(n / len(text)) for n in counts.values()) if text else 0.0


def _random_enough(value: str) -> bool:
    return (
        entropy(value) >= MIN_ENTROPY
        and any(c.isdigit() for c in value)
        and any(c.isalpha() for c in value)
        and not _REFERENCE.fullmatch(value)
    )


def secret_in_text(text: str) -> str | None:
    """What secret a text holds ('a private key', ...), or None; never the secret itself."""
    for reason, literals, pattern in _FORMATS:
        if any(literal in text for literal in literals) and pattern.search(text):
            return reason
    lowered = text.lower()
    for word in _KEYWORDS:
        at = lowered.find(word)
        while at != -1:
            m = _ASSIGNED.match(text, at + len(word))
            if m and _random_enough(m.group(1)):
                return "a key-like name assigned a random-looking value"
            at = lowered.find(word, at + 1)
    return None


def _words(key: str) -> list[str]:
    """`dbPassword`, `db_password`, `db-password.txt` -> ['db', 'password', ...], lower case."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", key)
    return [w for w in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if w]


@functools.lru_cache(maxsize=1024)  # a job's aliases repeat one value; sweeps build the same job many times
def secret_in_value(key: str, value: str) -> str | None:
    """What secret a value of a job file holds, judged with its key's name; None when it may be stored."""
    if redact(value) != value:
        return "credentials"
    found = secret_in_text(value)
    if found:
        return found
    words = _words(key)
    named = set(words) | {a + b for a, b in zip(words, words[1:], strict=False)}
    if value.strip() and not _REFERENCE.fullmatch(value.strip()) and not _PLACE.match(value):
        if named & _SECRET_WORDS:
            return f"a secret (its key {key!r} names one)"
        if named & _KEY_WORDS and re.fullmatch(r"[\w.=+/~-]{10,}", value) and _random_enough(value):
            return f"a secret (a random-looking value of {key!r})"
    return None


def secrets_in_job(raw: Any, path: str = "", key: str = "") -> list[str]:
    """One line per string of a raw job (keys and values, at any depth) that holds a secret, naming its field."""
    problems: list[str] = []
    if isinstance(raw, dict):
        for name, value in raw.items():
            here = f"{path}.{name}" if path else str(name)
            if isinstance(name, str) and redact(name) != name:
                problems.append(
                    f"{redact(here)}: credentials do not belong in a job file; they come from the environment"
                )
                continue
            problems += secrets_in_job(value, here, str(name))
    elif isinstance(raw, (list, tuple)):
        for i, value in enumerate(raw):
            problems += secrets_in_job(value, f"{path}.{i}", key)  # an item is judged by its list's key
    elif isinstance(raw, str):
        found = secret_in_value(key, raw)
        if found == "credentials":
            problems.append(
                f"{path}: {redact(raw)!r}: credentials do not belong in a job file; they come from the environment"
            )
        elif found:
            problems.append(
                f"{path}: holds {found}; secrets do not belong in a job file: your code reads them from the environment"
            )
    return problems
