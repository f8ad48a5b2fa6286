"""The Hugging Face DistilBERT distiller's training step, as the speed baseline of bench_train.

`examples/research_projects/distillation/distiller.py` (huggingface/transformers, the code that
trained DistilBERT) is not installable from a package index, so its `Distiller.step` and
`optimize` are restated here op for op (MLM, `restrict_ce_to_mask` off, fp32, no apex): the
teacher and the student run on the same batch, both (B, L, V) logits are kept, the KD term is
`KLDivLoss(batchmean)` over `masked_select`ed copies of both at every non-pad position, the MLM
term a cross-entropy over all positions' logits, the cosine term over `masked_select`ed last hidden
states; then backward, clipping, AdamW (torch's) and a linear schedule every `accum` micro-batches.
Same shapes, batches and student as distilcache's runs; only the step differs.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from cache_format.reader import CacheReader


def cached_batches(cache, micro: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The first n micro-batches of the cache's train split: (input ids, attention mask, MLM labels)."""
    reader = CacheReader(cache)
    rows = reader.read_rows("train", 0, micro * n, ["input_ids", "labels", "lengths"])
    ids = torch.from_numpy(rows["input_ids"].astype(np.int64))
    labels = torch.from_numpy(rows["labels"].astype(np.int64))
    mask = (torch.arange(ids.shape[1])[None] < torch.from_numpy(rows["lengths"])[:, None]).long()
    return [(ids[i : i + micro], mask[i : i + micro], labels[i : i + micro]) for i in range(0, micro * n, micro)]


def time_steps(teacher: nn.Module, student: nn.Module, batches: list, accum: int, temperature: float = 2.0,
               alphas: tuple[float, float, float] = (5.0, 2.0, 1.0)) -> list[float]:  # fmt: skip
    """Seconds of each optimizer step (`accum` micro-batches) of the HF distiller's loop."""
    alpha_ce, alpha_mlm, alpha_cos = alphas
    ce_loss_fct = nn.KLDivLoss(reduction="batchmean")
    lm_loss_fct = nn.CrossEntropyLoss(ignore_index=-100)
    cosine_loss_fct = nn.CosineEmbeddingLoss(reduction="mean")
    optimizer = torch.optim.AdamW(student.parameters(), lr=5e-4, betas=(0.9, 0.98), eps=1e-6)
    total = len(batches) // accum
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / max(total, 1)))
    teacher.eval()
    student.train()
    seconds = []
    for step in range(total):
        start = time.perf_counter()
        for input_ids, attention_mask, lm_labels in batches[step * accum : (step + 1) * accum]:
            s_out = student(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
            with torch.no_grad():
                t_out = teacher(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
            s_logits, t_logits = s_out.logits, t_out.logits
            mask = attention_mask.unsqueeze(-1).expand_as(s_logits).bool()
            s_slct = torch.masked_select(s_logits, mask).view(-1, s_logits.size(-1))
            t_slct = torch.masked_select(t_logits, mask).view(-1, s_logits.size(-1))
            loss_ce = (
                ce_loss_fct(
                    nn.functional.log_softmax(s_slct / temperature, dim=-1),
                    nn.functional.softmax(t_slct / temperature, dim=-1),
                )
                * temperature**2
            )
            loss = alpha_ce * loss_ce
            loss = loss + alpha_mlm * lm_loss_fct(s_logits.view(-1, s_logits.size(-1)), lm_labels.view(-1))
            s_hidden, t_hidden = s_out.hidden_states[-1], t_out.hidden_states[-1]
            hmask = attention_mask.unsqueeze(-1).expand_as(s_hidden).bool()
            dim = s_hidden.size(-1)
            s_h = torch.masked_select(s_hidden, hmask).view(-1, dim)
            t_h = torch.masked_select(t_hidden, hmask).view(-1, dim)
            loss = loss + alpha_cos * cosine_loss_fct(s_h, t_h, s_h.new(s_h.size(0)).fill_(1))
            (loss / accum).backward()
        nn.utils.clip_grad_norm_(student.parameters(), 5.0)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        seconds.append(time.perf_counter() - start)
    return seconds
