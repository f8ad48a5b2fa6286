"""What a cache holds and costs: the capture summary and `pipeline inspect`."""

from __future__ import annotations

import math
from dataclasses import asdict

import torch

from cache_format.encode import decode_values, teacher_top1
from cache_format.hidden import decode_hidden
from cache_format.kd_modes import KD_MODES, kd_advice, topk_mass
from cache_format.layout import FieldSpec, valid_positions
from cache_format.reader import CacheReader
from cache_format.selection import list_selections, read_record
from cache_format.settings import IGNORE_INDEX
from cache_format.store import CacheStore
from pipeline.errors import CacheError
from pipeline.log import human_bytes, human_time


def size_rows(manifest: dict) -> list[tuple[str, int, float, float]]:
    """(field, bytes on disk, bytes per token, compression ratio) for every field."""
    tokens = sum(s["tokens"] for s in manifest["counts"]["splits"].values()) or 1
    return [
        (name, f["bytes"], f["bytes"] / tokens, f["raw_bytes"] / max(f["bytes"], 1))
        for name, f in manifest["counts"]["fields"].items()
    ]


def storage_by_mode(manifest: dict) -> list[tuple[str, float]]:
    """(KD mode, bytes per token of the teacher fields its KD term reads) for the modes this cache
    holds the fields of (ids, labels and the hidden states of the cosine loss come on top)."""
    per_token = {name: b for name, _, b, _ in size_rows(manifest)}
    return [
        (mode.name, sum(per_token.get(n, 0.0) for n in mode.fields))
        for mode in KD_MODES.values()
        if mode.fields[0] in per_token
    ]


def stored_as(spec: FieldSpec) -> str:
    """A field's codec and per-position width: `int8 x384`, `nf4 x192` (two codes a byte), `float16 x3`."""
    codec = spec.logical_dtype or spec.dtype
    return f"{codec} x{spec.row_shape[-1]}" if len(spec.row_shape) > 1 else codec


def summary(store: CacheStore) -> str:
    """The block printed when a capture finishes (or a complete cache is reused)."""
    m = store.manifest
    assert m is not None, "summary of an incomplete cache"
    splits = m["counts"]["splits"]
    tokens = sum(s["tokens"] for s in splits.values())
    positions = sum(s["logit_positions"] for s in splits.values())
    seconds = m["counts"].get("wall_seconds", 0.0)
    total = sum(f["bytes"] for f in m["counts"]["fields"].values())
    full = positions * m["teacher"]["vocab_size"] * 4
    lines = [
        "cache-teacher summary",
        f"  cache       {store.url}",
        "  sequences   " + ", ".join(f"{n} {s['sequences']:,} x {s['views']} view(s)" for n, s in splits.items()),
        f"  tokens      {tokens:,} ({positions:,} with cached logits)",
        f"  wall time   {human_time(seconds)}   {tokens / max(seconds, 1e-9):,.0f} tokens/s",
        f"  on disk     {human_bytes(total)} = {total / max(tokens, 1):,.0f} B/token; fp32 full-vocabulary "
        f"logits would take {human_bytes(full)} ({full / max(total, 1):,.1f}x more)",
        f"  {'field':<15}{'stored as':<18}{'bytes':>12}{'B/token':>10}{'compression':>13}",
    ]
    specs = {f.name: f for f in store.fields()}
    for name, nbytes, per_token, ratio in size_rows(m):
        lines.append(
            f"  {name:<15}{stored_as(specs[name]):<18}{human_bytes(nbytes):>12}{per_token:>10.1f}{ratio:>12.2f}x"
        )
    lines += hidden_codec_lines(store.header.get("hidden_codec"))
    lines.append(
        "  teacher-logit bytes per token by KD mode: " + ", ".join(f"{mode} {b:,.1f}" for mode, b in storage_by_mode(m))
    )
    return "\n".join(lines)


def hidden_codec_lines(record: dict | None) -> list[str]:
    """How the hidden codec was settled: its fit, and under `auto` every candidate measured."""
    if not record:
        return []
    pilot = record["pilot"]
    line = f"  hidden codec {record['codec']}, settled on a pilot of {pilot['sequences']:,} sequences"
    line += f" ({pilot['tokens']:,} tokens)"
    if "fit_sha256" in record:
        line += f"; fitted in {record['fit_seconds']:.1f} s: {record['codes']} code bytes a token"
        line += f", sha256 {record['fit_sha256'][:12]}"
    lines = [line]
    if "candidates" in record:
        lines.append(f"  auto, fidelity_budget {record['budget']:g} (rebuilt-logit KL, T=1): " + ", ".join(
            f"{c['codec']} {c['bytes_per_token']:.0f} B {c['rebuilt_kl_t1']:.1e}" for c in record["candidates"]
        ))  # fmt: skip
    return lines


@torch.no_grad()
def rebuilt_stats(
    head: torch.nn.Module, hidden: torch.Tensor, k: int, temperatures: list[float], chunk: int = 1024
) -> dict[str, torch.Tensor]:
    """From exact logits head(hidden) of (n, H) positions, chunk by chunk: top-1 ids (n,), and per
    temperature (n, T) the top-k mass and the entropy."""
    top1, mass, entropy = [], [], []
    for a in range(0, len(hidden), chunk):
        logits = head(hidden[a : a + chunk].float())
        top1.append(logits.argmax(-1))
        log_p = torch.stack([torch.log_softmax(logits / t, -1) for t in temperatures], 1)  # (c, T, V)
        mass.append(log_p.topk(min(k, log_p.shape[-1]), -1).values.exp().sum(-1))
        entropy.append(-(log_p.exp() * log_p).sum(-1))
    empty = torch.zeros(0, len(temperatures))
    return {
        "top1": torch.cat(top1) if top1 else torch.zeros(0, dtype=torch.long),
        "mass": torch.cat(mass) if mass else empty,
        "entropy": torch.cat(entropy) if entropy else empty,
    }


def teacher_stats(reader: CacheReader, split: str = "train", sample_rows: int = 256) -> dict:
    """Per cached temperature: mean top-k probability mass at all and at masked positions (from the
    cached top-k and log-sum-exp, or from logits rebuilt by the cached head when the cache keeps no
    top-k) and exact entropy quantiles at masked positions (head); the masked-token accuracy."""
    outputs = reader.settings.outputs
    temps, k = [float(t) for t in outputs.temperatures], outputs.k
    data = reader.read_rows(split, 0, min(sample_rows, reader.layouts[split].rows))
    labels = torch.from_numpy(data["labels"]).long()
    valid = valid_positions(torch.from_numpy(data["lengths"]), labels.shape[1])
    masked = labels != IGNORE_INDEX
    head = reader.head()
    out: dict = {"rows": int(labels.shape[0]), "k": k, "temperatures": {}, "masked_accuracy": math.nan}
    rebuilt = None
    if head is not None:
        hidden = decode_hidden(data["hidden"], data.get("hidden_scale"), outputs.hidden_dtype, reader.hidden_fit())
        rebuilt = rebuilt_stats(head, hidden[valid], k, temps)
    at_masked = masked[valid]
    if "topk_indices" in data or "sample_ids" in data:
        top1 = teacher_top1(data)[masked]
    else:
        top1 = rebuilt["top1"][at_masked] if rebuilt is not None else None
    if top1 is not None and masked.any():
        out["masked_accuracy"] = float((top1 == labels[masked]).float().mean())
    cached = valid if outputs.logit_positions == "all" else masked
    for j, t in enumerate(temps):
        entry = {"topk_mass_all": math.nan, "topk_mass_masked": math.nan}
        if "topk_values" in data:
            values = decode_values(data["topk_values"], outputs.logits_dtype)  # (n, L, k)
            mass = topk_mass(values, torch.from_numpy(data["logsumexp"][..., j]), t)  # (n, L)
            entry["topk_mass_all"] = float(mass[cached].mean())
            entry["topk_mass_masked"] = float(mass[masked].mean()) if masked.any() else math.nan
        elif rebuilt is not None:
            entry["topk_mass_all"] = float(rebuilt["mass"][:, j].mean())
            entry["topk_mass_masked"] = float(rebuilt["mass"][at_masked, j].mean()) if masked.any() else math.nan
        if rebuilt is not None and masked.any():
            q = torch.quantile(rebuilt["entropy"][at_masked, j], torch.tensor([0.1, 0.5, 0.9]))
            entry["entropy_masked_p10_p50_p90"] = [round(float(x), 3) for x in q]
        out["temperatures"][str(t)] = entry
    return out


def inspect_text(reader: CacheReader, sample_rows: int = 256) -> str:
    m, st = reader.manifest, reader.settings
    assert m is not None
    t = st.teacher
    lines = [
        f"cache {reader.url}",
        f"  format        {m['format']} v{st.format_version}, fingerprint {st.fingerprint}",
        f"  teacher       {t.name} ({t.model_type}, {t.num_layers} layers, H={t.hidden_size}, V={t.vocab_size}, "
        f"{t.dtype})",
        f"  weights       sha256 {t.weights_sha256[:16]}...   tokenizer {st.tokenizer.sha256[:16]}...",
        f"  corpus        {m['config']['corpus']['source']} {', '.join(m['config']['corpus']['paths'])} "
        f"(fingerprint {m['corpus']['fingerprint'][:12]})",
        f"  masking       {asdict(st.masking)}  seed {st.seed}",
        f"  outputs       {asdict(st.outputs)}",
        f"  head          {'cached (exact logits available)' if st.head else 'not cached'}",
        f"  built         {m['created']} -> {m['completed']} with torch {m['versions']['torch']}, "
        f"transformers {m['versions']['transformers']}, zarr {m['versions']['zarr']}",
        "",
        summary(reader.store),
    ]
    stats = teacher_stats(reader, "train", sample_rows)
    k = stats["k"]
    lines += [
        "",
        f"teacher statistics on {stats['rows']} train rows (masked-token accuracy {stats['masked_accuracy']:.3f})",
        f"  {'T':>5}{f'top-{k} mass (all)':>19}{f'top-{k} mass (masked)':>22}{'entropy masked p10/p50/p90':>30}",
    ]
    for temp, e in stats["temperatures"].items():
        ent = "/".join(f"{x:.2f}" for x in e.get("entropy_masked_p10_p50_p90", [])) or "n/a (no head)"
        lines.append(f"  {temp:>5}{e['topk_mass_all']:>19.3f}{e['topk_mass_masked']:>22.3f}{ent:>30}")
    hot = max(stats["temperatures"], key=float)  # the highest cached T: where the top-k hold least
    e = stats["temperatures"][hot]
    if st.has_topk:
        lines.append(f"  KD: {kd_advice(st, k, float(hot), e['topk_mass_masked'], e['topk_mass_all'])}")
    return "\n".join(lines + selection_lines(reader))


def selection_lines(reader: CacheReader) -> list[str]:
    """The selections beside the cache (`pipeline select`), one line each; a damaged one says so."""
    names = list_selections(reader.storage)
    if not names:
        return []
    lines = ["", f"selections beside the cache ({len(names)}; train with --set data.selection=NAME)"]
    for name in names:
        try:
            r = read_record(reader.storage, name)
        except CacheError as exc:
            lines.append(f"  {name:<24}unreadable: {exc}")
            continue
        reference = f", reference {r['reference']}" if r.get("reference") else ""
        lines.append(
            f"  {name:<24}{r['kept_sequences']:,} of {r['sequences']:,} {r['split']} sequences, the {r['keep']} by "
            f"{r['score']}{reference}"
            + ("" if r.get("cache_fingerprint") == reader.settings.fingerprint else "  (made from another cache)")
        )
    return lines
