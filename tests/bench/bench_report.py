"""The Markdown report: machine, a summary row per measure beside its goal, then the details.

Every timed figure is ``median [min-max] (n)`` over its repeats.
"""

from __future__ import annotations

GIB = 2**30


def render(report: dict) -> str:
    measures, errors = report["measures"], report["errors"]
    lines = [
        "# hyperdistill benchmarks (issues 7 and 15)",
        "",
        f"Started {report['started']}; `{report['command']}`"
        + (f"; {report['total_seconds'] / 60:.1f} min in all." if "total_seconds" in report else "."),
        "",
        *_machine(report),
        "",
        "## Summary",
        "",
        "| id | measure | result | goal | meets goal |",
        "|---|---|---|---|---|",
    ]
    for name, row in _ROWS.items():
        if name in measures:
            lines.append(f"| {name} | " + " | ".join(row(measures[name])) + " |")
        elif name in errors:
            lines.append(f"| {name} | failed | see Errors | | |")
    for name, details in _DETAILS.items():
        if name in measures:
            lines += ["", f"## {name}", "", *details(measures[name])]
    if errors:
        lines += ["", "## Errors", ""]
        for name, text in errors.items():
            lines += [f"### {name}", "", "```", text.rstrip(), "```", ""]
    return "\n".join(lines) + "\n"


def stat(s: dict, scale: float = 1.0, digits: int = 2) -> str:
    """``median [min-max] (n)`` of a summarize() dict, times ``scale``."""
    f = f"{{:.{digits}f}}"
    return f"{f.format(s['median'] * scale)} [{f.format(s['min'] * scale)}-{f.format(s['max'] * scale)}] (n={s['n']})"


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def _machine(report: dict) -> list[str]:
    m = report["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    return [
        f"Machine: {m['cpu_model']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, Linux {m['kernel']}, "
        f"Python {m['python']}; {versions}.",
        "",
        f"Load average (1/5/15 min) at start {m['load_average_1_5_15']}, at end {report.get('load_average_end')}: "
        "on a shared machine (a load above the core count means other jobs competed for the CPU), "
        "times are noisy; byte counts, memory and ratios of interleaved runs are the robust figures.",
    ]


def _p1_row(r: dict) -> list[str]:
    return [
        "bytes/position at K=20 (gRPC vs `vllm serve` JSON)",
        f"ours {r['ours_framed_B']:.1f} B = {r['ours_vs_minimum']:.3f}x the packed minimum "
        f"{r['packed_minimum_B']} B; "
        f"JSON {r['vllm_json_B']:.0f} B = {r['json_vs_ours']:.1f}x ours",
        "<= 1.1x minimum; JSON >= 8x ours",
        _yes(r["ours_vs_minimum"] <= 1.1 and r["json_vs_ours"] >= 8),
    ]


def _p2_row(r: dict) -> list[str]:
    return [
        f"bytes -> [P, K] tensors, {r['positions']:,} positions",
        f"ours {r['ours_s']['median'] * 1e3:.1f} ms, JSON {r['json_s']['median'] * 1e3:.0f} ms: "
        f"{r['json_vs_ours']:.0f}x faster",
        ">= 100x faster",
        _yes(r["json_vs_ours"] >= 100),
    ]


def _p3_row(r: dict) -> list[str]:
    return [
        "positions/s: gRPC server (4 streams) / in-process / `vllm serve`",
        f"{r['server_positions_per_s']['median']:,.0f} / {r['inprocess_positions_per_s']['median']:,.0f} / "
        f"{r['vllm_serve_positions_per_s']['median']:,.0f}; server/in-process {r['server_vs_inprocess']:.2f}, "
        f"server/`vllm serve` {r['server_vs_vllm_serve']:.2f}",
        "server/in-process >= 0.95",
        _yes(r["server_vs_inprocess"] >= 0.95),
    ]


def _p4_row(r: dict) -> list[str]:
    runs = r["runs"]
    share = {k: 100 * v["wait_share_steps_2plus"] for k, v in runs.items()}
    teacher, trainer = r["teacher_compute_per_step_s"], r["trainer_compute_per_step_s"]
    if share["prefetch_on"] <= 5 or teacher < trainer:
        verdict = _yes(share["prefetch_on"] <= 5)
    else:
        verdict = f"n/a: teacher slower than trainer (replay run {_yes(share['replay'] <= 5)})"
    return [
        "step time blocked on the teacher (steps 2+)",
        f"prefetch on {share['prefetch_on']:.1f}%, off {share['prefetch_off']:.1f}%, replay teacher "
        f"{share['replay']:.1f}%; compute/step: teacher {teacher:.1f} s, trainer {trainer:.1f} s",
        "<= 5% with prefetch when teacher compute < trainer's",
        verdict,
    ]


def _p5_row(r: dict) -> list[str]:
    c = r["variants"]["chunked_1024"]
    diff = f"; naive loss rel. diff {r['naive_loss_rel_diff']:.1e}" if "naive_loss_rel_diff" in r else ""
    return [
        f"top-K KL fwd+bwd, T={r['positions']:,}, V={r['vocab']:,}",
        f"peak naive {r['naive_peak_bytes_at_T'] / GIB:.1f} GiB vs chunked(1024) "
        f"{c['peak_bytes_above_inputs'] / GIB:.2f} GiB = {r['naive_vs_chunked_1024_memory']:.1f}x "
        f"(chunk 512: {r['naive_vs_chunked_512_memory']:.1f}x; before the fix, checkpointed(1024): "
        f"{r['naive_vs_checkpointed_1024_memory']:.1f}x){diff}",
        "memory >= 10x, same value",
        _yes(r["naive_vs_chunked_1024_memory"] >= 10),
    ]


def _p6_row(r: dict) -> list[str]:
    s = r["seconds"]
    return [
        "student fwd+bwd: HyperLoRA / PEFT LoRA / none",
        f"{s['hyper']['median']:.2f} / {s['peft']['median']:.2f} / {s['none']['median']:.2f} s; "
        f"HyperLoRA/PEFT {r['hyper_vs_peft']:.2f}x (applying generated factors only: "
        f"{r['hyper_apply_vs_peft']:.2f}x)",
        "HyperLoRA/PEFT <= 1.25x",
        _yes(r["hyper_vs_peft"] <= 1.25),
    ]


def _p1_details(r: dict) -> list[str]:
    return [
        f"{r['sequences']} sequences, {r['positions']:,} scored positions, K={r['top_k']}, "
        f"log-probs as {r['wire_dtype']}; "
        f"our stream sent {r['chunks']} ScoreChunks.",
        "",
        "| bytes per position | B |",
        "|---|---|",
        f"| packed minimum K x (4 + 2) | {r['packed_minimum_B']} |",
        f"| ours: packed arrays (ids, log-probs, target log-prob) | {r['ours_payload_B']:.2f} |",
        f"| ours: serialized ScoreChunk messages | {r['ours_message_B']:.2f} |",
        f"| ours: + gRPC 5-byte message prefix | {r['ours_framed_B']:.2f} |",
        f"| `vllm serve` /v1/completions response body | {r['vllm_json_B']:.1f} |",
    ]


def _p2_details(r: dict) -> list[str]:
    return [
        "| client path | total ms | ns/position |",
        "|---|---|---|",
        f"| ours: ScoreChunk.FromString + TopKAssembler + torch.from_numpy | {stat(r['ours_s'], 1e3, 1)} | "
        f"{r['ours_ns_per_position']:.0f} |",
        f"| JSON: json.loads + loop over entries + torch.from_numpy | {stat(r['json_s'], 1e3, 0)} | "
        f"{r['json_ns_per_position']:.0f} |",
        "",
        f"Both servers' answers agree: {100 * r['ids_equal_share']:.2f}% of top-K ids equal (the rest are near-ties), "
        f"largest log-prob difference {r['max_abs_logprob_diff']:.2e} (ours is float16 on the wire), "
        f"target log-prob {r['max_abs_target_diff']:.2e}.",
    ]


def _p3_details(r: dict) -> list[str]:
    return [
        f"{r['positions']:,} positions per pass; {r['streams']} concurrent streams / connections.",
        "",
        "| path | positions/s |",
        "|---|---|",
        f"| our gRPC server | {stat(r['server_positions_per_s'], digits=0)} |",
        "| same engine in-process (`build_engine`, `await engine.score`) | "
        f"{stat(r['inprocess_positions_per_s'], digits=0)} |",
        f"| `vllm serve` /v1/completions | {stat(r['vllm_serve_positions_per_s'], digits=0)} |",
    ]


def _p4_details(r: dict) -> list[str]:
    lines = [
        f"{r['steps_per_run']} optimizer steps per run, {r['tokens_per_step']:,.0f} tokens per step (2 ranks); "
        f"prefetch on = `teacher.prefetch_batches={r['prefetch_batches_on']}`, off = 0. Teacher alone: "
        f"{r['teacher_positions_per_s_alone']:,.0f} positions/s, i.e. {r['teacher_compute_per_step_s']:.1f} s "
        f"per step's "
        f"batches; trainer compute per step (replay run, step - wait): {r['trainer_compute_per_step_s']:.1f} s.",
        "",
        "Steps 2+ are the steady state: the first step also waits for the pipeline to fill (the first batch "
        "cannot be prefetched). Wait share = sum of teacher waits / sum of step times (rank 0).",
        "",
        "| run | wait share, all steps | wait share, steps 2+ | step s (2+) | wait s (2+) | compute s (2+) "
        "| first step: step / wait s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in r["runs"].items():
        lines.append(
            f"| {name} | {100 * s['wait_share_all_steps']:.1f}% | {100 * s['wait_share_steps_2plus']:.1f}% | "
            f"{stat(s['step_s'], digits=1)} | {stat(s['teacher_wait_s'], digits=2)} | "
            f"{stat(s['trainer_compute_s'], digits=1)} | "
            f"{s['first_step']['step_s']:.1f} / {s['first_step']['teacher_wait_s']:.1f} |"
        )
    return lines


def _p5_details(r: dict) -> list[str]:
    lines = [
        f"H={r['hidden']}, K={r['top_k']}; peak = max RSS above the RSS with inputs and LM head allocated, "
        "one child process per variant.",
        "",
        "| variant | T | wall s | CPU s | peak GiB | loss |",
        "|---|---|---|---|---|---|",
    ]
    for name, v in r["variants"].items():
        lines.append(
            f"| {name} | {v['positions']:,} | {stat(v['seconds'], digits=1)} | "
            f"{stat(v['cpu_seconds'], digits=1)} | "
            f"{v['peak_bytes_above_inputs'] / GIB:.2f} | {v['loss']:.6f} |"
        )
    short = [
        f"{name} at T={v['positions']:,}"
        for name, v in r["variants"].items()
        if name != "naive" and v["positions"] != r["positions"]
    ]
    if short:
        lines += [
            "",
            f"{', '.join(short)}: a chunked loss's peak is one chunk's, whatever T; its time is compared per position.",
        ]
    if r["naive_positions_measured"] != r["positions"]:
        lines += [
            "",
            f"The naive loss ran at T={r['naive_positions_measured']:,} (free memory); its peak is scaled "
            f"linearly to T={r['positions']:,}: {r['naive_peak_bytes_at_T'] / GIB:.1f} GiB.",
        ]
    if "naive_loss_rel_diff" in r:
        lines += [
            "",
            f"Same value: naive vs chunked(1024) loss relative difference {r['naive_loss_rel_diff']:.1e}, "
            f"gradient checksum (sum of |dL/dh|) {r['naive_grad_checksum_rel_diff']:.1e}.",
        ]
    lines += [
        "",
        f"Before the fix (checkpointed(1024), commit 7dd378c) vs chunked(1024): loss relative difference "
        f"{r['checkpointed_loss_rel_diff']:.1e}, gradient checksum "
        f"{r['checkpointed_grad_checksum_rel_diff']:.1e}.",
        "",
        "naive / variant (time per position): "
        + "; ".join(
            f"{name}: memory {r[f'naive_vs_{name}_memory']:.1f}x, time {r[f'naive_vs_{name}_time']:.2f}x"
            for name in r["variants"]
            if name != "naive"
        ),
    ]
    return lines


def _p6_details(r: dict) -> list[str]:
    lines = [
        f"Batch {r['batch'][0]} x {r['batch'][1]} tokens (prompts {r['prompt_tokens']} tokens), rank {r['rank']}, "
        f"alpha {r['alpha']}, targets {', '.join(r['targets'])}: {r['hyper_targets']} modules "
        f"(PEFT wraps {r['peft_wrapped_modules']}); trainable: PEFT {r['peft_trainable_params']:,}, "
        f"hypernetwork {r['hyper_trainable_params']:,}; torch threads: {r['threads']}.",
        "",
        "| variant | wall s | CPU s |",
        "|---|---|---|",
    ]
    for name, s in r["seconds"].items():
        lines.append(f"| {name} | {stat(s)} | {stat(r['cpu_seconds'][name])} |")
    lines += ["", f"PEFT/none {r['peft_vs_none']:.2f}x, HyperLoRA/none {r['hyper_vs_none']:.2f}x."]
    return lines


def _p7_row(r: dict) -> list[str]:
    once = r["teacher_positions_precompute"] == r["distinct_positions"] and r["teacher_positions_training"] == 0
    return [
        f"teacher top-K cache, {r['epochs']}-epoch run: teacher positions scored / distinct; "
        "trainer steps/s from the cache / from an instant in-memory teacher",
        f"{r['teacher_positions_precompute']:,.0f} / {r['distinct_positions']:,} "
        f"(+{r['teacher_positions_training']:,.0f} while training); {r['steps_per_s_ratio']:.3f}",
        "scored exactly once; >= 0.95",
        _yes(once and r["steps_per_s_ratio"] >= 0.95),
    ]


def _p7_details(r: dict) -> list[str]:
    from tests.bench.bench_cache_encoding import table

    s = r["step_s"]
    return [
        f"{r['sequences']} distinct sequences, {r['distinct_positions']:,} positions; precompute "
        f"{r['precompute_seconds']:.0f} s ({r['precompute_positions_per_second']:.0f} positions/s on this "
        f"machine's demo teacher), {r['cache_bytes_per_position']:.0f} B/position on disk. Training: "
        f"{r['training_steps']} steps, {r['tokens_trained']:,} tokens with the teacher up and unasked.",
        "",
        f"Step time (steps 2+): from the cache {stat(s['cache'])} s, in-memory teacher {stat(s['in_memory'])} s.",
        "",
        "Encodings (`python -m tests.bench.bench_cache_encoding`), the loss against float32:",
        "",
        table(r["encodings"]),
    ]


_ROWS = {
    "P1": _p1_row,
    "P2": _p2_row,
    "P3": _p3_row,
    "P4": _p4_row,
    "P5": _p5_row,
    "P6": _p6_row,
    "P7": _p7_row,
}
_DETAILS = {
    "P1": _p1_details,
    "P2": _p2_details,
    "P3": _p3_details,
    "P4": _p4_details,
    "P5": _p5_details,
    "P6": _p6_details,
    "P7": _p7_details,
}
