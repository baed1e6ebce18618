"""Score (prompt, reply) pairs with any sequence-classification reward model; compare two models.

Input layout (the same for ``rahf train-rm`` training and for scoring, so a trained RM sees at
test time exactly what it saw in training):

* with a chat template: ``apply_chat_template(prompt + [assistant reply], tokenize=False)``
  (no generation prompt: the reply is part of the conversation);
* without one: the plain ``Human: ...\\n\\nAssistant: ...`` layout of training prompts
  (``rahf.data.render.render_plain``), the reply as the last Assistant turn, then EOS.

Replies are cut to their first ``max_reply_tokens`` tokens and the oldest prompt tokens are cut
so the whole fits ``max_length``. The reward is the model's single logit, read (by transformers)
at the last non-padding token, so batches are right-padded with ``config.pad_token_id`` set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from rahf.data.render import has_chat_template, render_plain
from rahf.data.schema import Message, PreferencePair
from rahf.evaluate.stats import (
    DEFAULT_RESAMPLES,
    Estimate,
    bootstrap,
    length_controlled_win_rate,
    win_outcomes,
)
from rahf.hidden_states import pad_ids
from rahf.models import ModelError, resolve_model_path, torch_dtype


@dataclass
class RewardModel:
    model: torch.nn.Module
    tokenizer: object
    path: str


def load_reward_model(name_or_path: str, *, device: str | None = None, dtype: str = "float32") -> RewardModel:
    """An ``AutoModelForSequenceClassification`` with one output and a pad token id set."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    path = resolve_model_path(name_or_path)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch_dtype(dtype, device))
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise ModelError(f"cannot load reward model '{name_or_path}': {err}") from err
    if model.config.num_labels != 1:
        raise ModelError(
            f"reward model '{name_or_path}' has {model.config.num_labels} outputs; a reward model has"
            " one (train one with `rahf train-rm`)"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return RewardModel(model.to(device).eval(), tokenizer, path)


def render_for_reward(tokenizer, prompt: Sequence[Message], reply: str) -> str:
    """The text a reward model reads for one (prompt, reply) (module docstring: layout)."""
    messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
    if has_chat_template(tokenizer):
        messages.append({"role": "assistant", "content": reply})
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return render_plain(messages) + " " + reply + (tokenizer.eos_token or "")


def reward_input_ids(
    tokenizer,
    prompt: Sequence[Message],
    reply: str,
    *,
    max_length: int = 1024,
    max_reply_tokens: int = 512,
) -> list[int]:
    """Token ids of one (prompt, reply): reply cut to its first tokens, then oldest tokens cut."""
    reply_ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
    if len(reply_ids) > max_reply_tokens:
        reply = tokenizer.decode(reply_ids[:max_reply_tokens]).rstrip("\ufffd")
    ids = tokenizer(render_for_reward(tokenizer, prompt, reply), add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos) and not has_chat_template(tokenizer):
        ids = [bos, *ids]
    return ids[-max_length:]  # keep the end: the reply and its end-of-turn token


@torch.no_grad()
def score_rewards(
    rm: RewardModel,
    prompts: Sequence[Sequence[Message]],
    replies: Sequence[str],
    *,
    batch_size: int = 8,
    max_length: int = 1024,
    max_reply_tokens: int = 512,
    progress: bool = True,
    desc: str = "reward",
) -> np.ndarray:
    """The reward of each (prompt, reply), in input order."""
    encoded = [
        reward_input_ids(rm.tokenizer, p, r, max_length=max_length, max_reply_tokens=max_reply_tokens)
        for p, r in zip(prompts, replies, strict=True)
    ]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    pad = rm.model.config.pad_token_id
    device = next(rm.model.parameters()).device
    scores = np.zeros(len(encoded))
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
        idx = order[start : start + batch_size]
        # Right padding: the classifier reads the last non-pad token of each row.
        input_ids, attention_mask = pad_ids([encoded[i] for i in idx], pad)
        logits = rm.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        scores[idx] = logits[:, 0].float().cpu().numpy()
    return scores


def pairwise_accuracy(
    rm: RewardModel,
    pairs: list[PreferencePair],
    *,
    max_length: int = 512,
    max_reply_tokens: int = 256,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Accuracy of ``rm`` on pairs (chosen scored higher; ties 1/2) and of "the longer reply wins".

    Length is counted in the RM tokenizer's tokens of the full reply; equal lengths tie.
    """
    prompts = [p.prompt for p in pairs]
    kwargs = {"max_length": max_length, "max_reply_tokens": max_reply_tokens, "progress": progress}
    chosen = score_rewards(rm, prompts, [p.chosen for p in pairs], desc="reward (chosen)", **kwargs)
    rejected = score_rewards(rm, prompts, [p.rejected for p in pairs], desc="reward (rejected)", **kwargs)

    def length(text: str) -> int:
        return len(rm.tokenizer(text, add_special_tokens=False)["input_ids"])

    longer = win_outcomes([length(p.chosen) for p in pairs], [length(p.rejected) for p in pairs])
    return {
        "n": len(pairs),
        "accuracy": bootstrap(win_outcomes(chosen, rejected), resamples=resamples, seed=seed).to_dict(),
        "longer_wins_accuracy": bootstrap(longer, resamples=resamples, seed=seed).to_dict(),
        "mean_margin": float(np.mean(chosen - rejected)),
    }


@dataclass
class Comparison:
    """Model A against baseline B on the same prompts, judged by a reward model."""

    mean_score: Estimate
    baseline_mean_score: Estimate
    win_rate: Estimate  # ties count 1/2
    length_controlled_win_rate: Estimate
    wins: int
    ties: int
    losses: int

    def to_dict(self) -> dict:
        out = {k: v.to_dict() for k, v in vars(self).items() if isinstance(v, Estimate)}
        return {**out, "wins": self.wins, "ties": self.ties, "losses": self.losses}


def compare(
    scores: np.ndarray,
    baseline_scores: np.ndarray,
    lengths: Sequence[float],
    baseline_lengths: Sequence[float],
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    tie_tolerance: float = 1e-6,
) -> Comparison:
    """Mean scores, raw and length-controlled win rates of A over B with bootstrap intervals."""
    outcomes = win_outcomes(scores, baseline_scores, tie_tolerance=tie_tolerance)
    return Comparison(
        mean_score=bootstrap(scores, resamples=resamples, seed=seed),
        baseline_mean_score=bootstrap(baseline_scores, resamples=resamples, seed=seed),
        win_rate=bootstrap(outcomes, resamples=resamples, seed=seed),
        length_controlled_win_rate=length_controlled_win_rate(
            outcomes, np.asarray(lengths), np.asarray(baseline_lengths), resamples=resamples, seed=seed
        ),
        wins=int((outcomes == 1).sum()),
        ties=int((outcomes == 0.5).sum()),
        losses=int((outcomes == 0).sum()),
    )
