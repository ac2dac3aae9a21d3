"""Many visitors at once, through the serving scheduler: `python -m bench.load --out bench/results` (a GPU), or
`python -m bench.load --tiny --out /tmp/load` (a CPU smoke test on the tiny checkpoint).

Full-size architecture from the released config, random bf16 weights (`bench.bench.fill_random_`), served by
`serving.scheduler.Scheduler` exactly as the Space serves it on a dedicated GPU (not `model.generate`):

  * text: N visitors (1, 4, 8, 16, 32) arriving evenly over a few seconds, each with its own 1,000-token chat
    prompt, asking for 256 new tokens (greedy); then 16 and 32 visitors arriving at the same moment. Reported: aggregate tok/s (all tokens over the first arrival to the
    last token, ramp included; and while all N stream at once: from the last visitor's first token to the first
    visitor's last), per-visitor tok/s after its first token (median and 5th percentile), time to first token p50/p95,
    peak GPU memory against the scheduler's KV budget, and the batch roofline for N rows (`bench.batch.step_bytes`
    over the measured copy bandwidth);
  * speech: 8 visitors each asking for a spoken reply, the thinker's text through the scheduler, the talker (0.5B
    shape, as bench/speech.py) speaking for all of them at once, a row each, and the flow decoder and vocoder shared
    sentence by sentence (`SharedSpeech`). The
    reply's text is scripted, one word per real thinker token, and each sentence's talker run stops at the length
    of natural speech (bench/speech.py says why). Reported: first audio p50/p95 after arrival, the real-time factor
    of each visitor's reply (wall time from arrival to the last chunk over the audio's length) and the longest
    stall a listener would hear (a chunk made after the audio before it ran out).

The whole GPU run takes a few minutes: model build and random fill, one capture per batch bucket, then each load.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field

import torch

from bench.batch import step_bytes
from bench.bench import ASSISTANT, HUMAN, copy_bandwidth, fill_random_
from ming.configs import RELEASE_CONFIG
from ming.modeling import MingOmni
from ming.sampling import SamplingConfig
from serving.scheduler import PREFILL_CHUNK, Scheduler, SharedSpeech

VISITORS = (1, 4, 8, 16, 32)
BURSTS = (16, 32)  # also all arriving at the same moment
SPEAKERS = 8


@dataclass
class Visit:
    """One simulated visitor's timeline (perf_counter seconds)."""

    arrival: float = 0.0
    first_token: float | None = None
    last_token: float | None = None
    tokens: int = 0
    token_times: list[float] = field(default_factory=list)
    audio: list[tuple[float, float]] = field(default_factory=list)  # (when made, seconds of audio)
    error: str = ""

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival

    @property
    def decode_rate(self) -> float:
        span = self.last_token - self.first_token
        return (self.tokens - 1) / span if span > 0 else float("nan")

    @property
    def audio_seconds(self) -> float:
        return sum(seconds for _, seconds in self.audio)

    @property
    def first_audio(self) -> float:
        return self.audio[0][0] - self.arrival

    @property
    def rtf(self) -> float:
        return (self.audio[-1][0] - self.arrival) / self.audio_seconds

    @property
    def longest_stall(self) -> float:
        """How long a listener who starts playing at the first chunk waits, at worst, for the next chunk."""
        played_until, stall = self.audio[0][0], 0.0
        for made, seconds in self.audio:
            stall = max(stall, made - played_until)
            played_until = max(played_until, made) + seconds
        return stall


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a short list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def visitor_prompt(length: int, seed: int) -> torch.Tensor:
    """A chat-shaped prompt of `length` tokens, different for every visitor."""
    body = torch.randint(1000, 100000, (length - 3,), generator=torch.Generator().manual_seed(1000 + seed))
    return torch.cat([torch.tensor([HUMAN]), body, torch.tensor([ASSISTANT, HUMAN])])[None]


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def arrive(visits: list[Visit], arrival_s: float, work) -> float:
    """Run `work(i, visit)` for every visitor on its own thread, visitor i arriving at i / n * arrival_s; returns
    the wall time from the first arrival to the end of the last visit."""
    n = len(visits)
    start = time.perf_counter() + 0.05

    def run(i: int) -> None:
        time.sleep(max(0.0, start + i / n * arrival_s - time.perf_counter()))
        visits[i].arrival = time.perf_counter()
        try:
            work(i, visits[i])
        except Exception as error:  # noqa: BLE001 - reported, never hidden
            visits[i].error = f"{type(error).__name__}: {error}"

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def text_load(scheduler: Scheduler, n: int, prompt: int, new_tokens: int, arrival_s: float) -> dict:
    visits = [Visit() for _ in range(n)]

    def work(i: int, visit: Visit) -> None:
        stream = scheduler.submit({"input_ids": visitor_prompt(prompt, i)}, SamplingConfig(max_new_tokens=new_tokens))
        for _ in stream:
            now = time.perf_counter()
            visit.first_token = visit.first_token or now
            visit.last_token = now
            visit.tokens += 1
            visit.token_times.append(now)

    reset_peak()
    scheduler.peak_active = 0
    wall = arrive(visits, arrival_s, work)
    done = [v for v in visits if not v.error and v.tokens]
    rates = [v.decode_rate for v in done if v.tokens > 1]
    ttfts = [v.ttft for v in done]
    span = max(v.last_token for v in done) - min(v.arrival for v in visits)
    # While every visitor streams: from the last one's first token to the first one's last token.
    window = (max(v.first_token for v in done), min(v.last_token for v in done))
    all_streaming_s = window[1] - window[0]
    in_window = sum(window[0] <= t <= window[1] for v in done for t in v.token_times)
    return {
        "visitors": n, "errors": [v.error for v in visits if v.error],
        "tokens": sum(v.tokens for v in visits), "wall_s": wall,
        "aggregate_tok_s": sum(v.tokens for v in visits) / span,
        "all_streaming_s": all_streaming_s,
        "all_streaming_tok_s": in_window / all_streaming_s if all_streaming_s > 0.1 else None,
        "per_visitor_tok_s_median": statistics.median(rates), "per_visitor_tok_s_p5": percentile(rates, 5),
        "ttft_p50_ms": 1000 * percentile(ttfts, 50), "ttft_p95_ms": 1000 * percentile(ttfts, 95),
        "peak_memory_gib": peak_memory_gib(),
        "peak_batch": scheduler.peak_active,
    }


def speech_load(scheduler: Scheduler, speech: SharedSpeech, n: int, prompt: int, arrival_s: float,
                trace: str | None = None) -> dict:
    from bench.speech import REPLY, scripted_reply

    words = [w + " " for w in REPLY.split()]
    speaker = torch.randn(1, 192, generator=torch.Generator().manual_seed(0))
    visits = [Visit() for _ in range(n)]

    def work(i: int, visit: Visit) -> None:
        stream = scheduler.submit({"input_ids": visitor_prompt(prompt, 100 + i)},
                                  SamplingConfig(max_new_tokens=len(words) + 1), thinker_states=True)
        for event in speech.stream(scripted_reply(stream, words), stream.thinker_states, voice=speaker, seed=i):
            if event.text_delta:
                visit.tokens += 1
                visit.first_token = visit.first_token or time.perf_counter()
            if event.audio is not None and len(event.audio):
                visit.audio.append((time.perf_counter(), len(event.audio) / speech.sample_rate))

    talker_calls = getattr(speech.speech.talker, "calls", [])  # bench.speech's timing wrappers, when present
    flow_calls = getattr(speech.speech.detokenizer, "calls", [])
    talker_calls.clear()
    flow_calls.clear()
    reset_peak()
    with warnings.catch_warnings(record=True) as caught:  # graph captures that failed (and fell back to eager)
        warnings.simplefilter("always")
        tracing = threading.Thread(target=record_trace, args=(trace, arrival_s + 2.0, 3.0), daemon=True)
        if trace:
            tracing.start()
        wall = arrive(visits, arrival_s, work)
        if trace:
            tracing.join()
    done = [v for v in visits if not v.error and v.audio]
    firsts = [v.first_audio for v in done]
    return {
        "talker_s_per_sentence_median": statistics.median(s for _, s in talker_calls) if talker_calls else None,
        "flow_vocoder_s_per_sentence_median": statistics.median(flow_calls) if flow_calls else None,
        "sentences": len(flow_calls),
        "failed_graph_captures": sum("capture failed" in str(w.message) for w in caught),
        "visitors": n, "errors": [v.error for v in visits if v.error], "wall_s": wall,
        "first_audio_p50_ms": 1000 * percentile(firsts, 50), "first_audio_p95_ms": 1000 * percentile(firsts, 95),
        "rtf": [round(v.rtf, 3) for v in done], "rtf_max": max(v.rtf for v in done),
        "longest_stall_s": max(v.longest_stall for v in done),
        "audio_s_per_visitor": statistics.median(v.audio_seconds for v in done),
        "ttft_p50_ms": 1000 * percentile([v.ttft for v in done], 50),
        "peak_memory_gib": peak_memory_gib(),
    }


def record_trace(path: str, after_s: float, seconds: float) -> None:
    """A Chrome trace of every thread's torch calls and the GPU's kernels, `seconds` long, starting `after_s` from
    now (when all speaking visitors have arrived)."""
    from torch._C._profiler import _ExperimentalConfig
    from torch.profiler import ProfilerActivity, profile

    time.sleep(after_s)
    every_thread = _ExperimentalConfig(profile_all_threads=True, enable_cuda_sync_events=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, experimental_config=every_thread) as recording:
        time.sleep(seconds)
    recording.export_chrome_trace(path)
    os.system(f"gzip -f {path}")


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib() -> float:
    """Peak GPU memory allocated during the last load; on the CPU, the process's peak resident memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# --------------------------------------------------------------------------------------------------------- models
def full_size(device: torch.device) -> tuple[MingOmni, SharedSpeech]:
    from bench.speech import build_speech

    model = MingOmni.from_config(RELEASE_CONFIG, device=device, dtype=torch.bfloat16)
    fill_random_(model)
    from bench.speech import SpeakingRateTalker

    shared = SharedSpeech(build_speech("0.5b", model.config.llm_config.hidden_size, device))
    # Each sentence stops at the length of natural speech, as in bench.speech (a random talker never says <audio_eos>).
    shared.speech.talker = SpeakingRateTalker(shared.speech.talker, synchronize=False)
    shared.speech.detokenizer.capture_graphs()  # as serving.engine does at start-up
    return model, shared


def tiny() -> tuple[MingOmni, SharedSpeech]:
    from ming.speech import SpeechGenerator
    from ming.testing.tiny import build_tiny_checkpoint

    folder = build_tiny_checkpoint(tempfile.mkdtemp(prefix="tiny-load-"))
    return MingOmni.from_pretrained(folder, dtype=torch.float32), SharedSpeech(SpeechGenerator.from_pretrained(folder))


# ----------------------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test on the tiny checkpoint")
    parser.add_argument("--max-active", type=int, default=32)
    parser.add_argument("--prefill-chunk", type=int, default=PREFILL_CHUNK, help="prompt tokens per loop turn")
    parser.add_argument("--only", choices=("text", "speech"), help="run one of the two loads (the report says so)")
    parser.add_argument("--trace", metavar="FILE", help="also write a Chrome trace (CPU threads and GPU) of a few "
                        "seconds in the middle of the speech load, gzipped, for chrome://tracing or Perfetto")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if args.tiny:
        visitors, prompt, new_tokens, arrival_s, speakers, bursts = (1, 2, 4), 64, 16, 0.5, 2, (4,)
        card, described = "cpu_tiny", "Tiny random checkpoint on the CPU (a smoke test of the benchmark, not a figure)"
        model, speech = tiny()
        bandwidth = None
    else:
        visitors, prompt, new_tokens, arrival_s, speakers, bursts = VISITORS, 1000, 256, 2.0, SPEAKERS, BURSTS
        card, described = torch.cuda.get_device_name(), "Full-size architecture, random bf16 weights"
        model, speech = full_size(torch.device("cuda"))
        bandwidth = copy_bandwidth()
    weights_gib = torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    started = time.perf_counter()
    # The KV budget from the memory free now, as the engine works it out at start-up.
    scheduler = Scheduler(model, max_active=args.max_active, prefill_chunk=args.prefill_chunk)
    setup_s = time.perf_counter() - started
    print(f"scheduler: {scheduler.rows} rows x {scheduler.capacity} slots, KV {scheduler.kv_bytes / 2**30:.1f} GiB "
          f"of a {scheduler.budget / 2**30:.1f} GiB budget; steps made in {setup_s:.1f} s", flush=True)
    try:
        text_load(scheduler, 2, prompt, 8, 0.0)  # warm-up: prefill kernels, the first buckets
        speech_load(scheduler, speech, 1, prompt, 0.0)  # warm-up: talker and flow captures

        def measure(n: int, arrival: float, label: str = "") -> dict:
            row = text_load(scheduler, n, prompt, new_tokens, arrival)
            if bandwidth is not None:
                row["roofline_tok_s"] = bandwidth / step_bytes(model.config, n, prompt + new_tokens // 2) * n
                row["of_roofline"] = row["aggregate_tok_s"] / row["roofline_tok_s"]
            print(label, row, flush=True)
            return row

        rows, burst, spoken = [], [], None
        if args.only != "speech":
            rows = [measure(n, arrival_s if n > 1 else 0.0) for n in visitors]
            # The same visitors all arriving at once: every prompt is prefilled first (one per turn, streams starting
            # as they are ready), then all stream together for most of the run.
            burst = [measure(n, 0.0, "at once:") for n in bursts]
        if args.only != "text":
            alone = speech_load(scheduler, speech, 1, prompt, 0.0)
            print("one spoken reply alone:", alone, flush=True)
            spoken = speech_load(scheduler, speech, speakers, prompt, arrival_s, trace=args.trace)
            spoken["alone"] = alone
            print(spoken, flush=True)
    finally:
        scheduler.close()
    report = {"card": card, "model": described, "date": datetime.date.today().isoformat(), "prompt": prompt,
              "new_tokens": new_tokens, "prefill_chunk": args.prefill_chunk,
              "arrival_s": arrival_s, "rows": scheduler.rows, "capacity": scheduler.capacity,
              "kv_gib": scheduler.kv_bytes / 2**30, "budget_gib": scheduler.budget / 2**30,
              "weights_gib": weights_gib, "copy_bandwidth_tbps": bandwidth / 1e12 if bandwidth else None,
              "setup_s": setup_s, "only": args.only, "text": rows, "text_at_once": burst, "speech": spoken}
    write_report(report, args.out)


def write_report(report: dict, out: str) -> None:
    name = f"{report['date']}_{report['card'].replace(' ', '_')}_load" + (f"_{report['only']}" if report.get("only") else "")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, name + ".json"), "w") as f:
        json.dump(report, f, indent=2)
    r = report
    lines = [f"# Many visitors at once through the scheduler: {r['card']}, {r['date']}", "",
             f"{r['model']}; each visitor a {r['prompt']}-token prompt and "
             f"{r['new_tokens']} new tokens (greedy), arriving evenly over {r['arrival_s']} s. Scheduler: "
             f"{r['rows']} rows x {r['capacity']} slots, KV cache {r['kv_gib']:.1f} GiB of a {r['budget_gib']:.1f} "
             f"GiB budget; weights {r['weights_gib']:.1f} GiB. `python -m bench.load`.", "",
             "| visitors | aggregate tok/s | while all stream tok/s (window s) | per visitor tok/s (median / p5) | "
             "TTFT p50 / p95 ms | peak batch | peak memory GiB | roofline tok/s | of roofline |",
             "|---|---|---|---|---|---|---|---|---|"] if r["text"] else []
    for row in r["text"] + [dict(row, visitors=f"{row['visitors']} at once") for row in r.get("text_at_once", [])]:
        roofline = "- | -"
        if "roofline_tok_s" in row:
            roofline = f"{row['roofline_tok_s']:.0f} | {100 * row['of_roofline']:.0f}%"
        steady = row.get("all_streaming_tok_s")
        steady = f"{steady:.0f} ({row['all_streaming_s']:.1f})" if steady else "-"
        lines.append(f"| {row['visitors']} | {row['aggregate_tok_s']:.0f} | {steady} | {row['per_visitor_tok_s_median']:.0f} / "
                     f"{row['per_visitor_tok_s_p5']:.0f} | {row['ttft_p50_ms']:.0f} / {row['ttft_p95_ms']:.0f} | "
                     f"{row['peak_batch']} | {row['peak_memory_gib']:.1f} | {roofline} |")
    s = r["speech"] or {"errors": []}
    if r["speech"]:
        lines += ["", f"Spoken replies, {s['visitors']} visitors at once (0.5B-shape talker speaking for all at "
                  "once, flow decoder and vocoder shared sentence by sentence, earliest deadline first):", "",
                  "| first audio p50 / p95 ms | RTF per visitor (max) | longest stall s | audio per visitor s | "
                  "peak memory GiB |", "|---|---|---|---|---|",
                  f"| {s['first_audio_p50_ms']:.0f} / {s['first_audio_p95_ms']:.0f} | {s['rtf_max']:.2f} "
                  f"({', '.join(f'{x:.2f}' for x in s['rtf'])}) | {s['longest_stall_s']:.2f} | "
                  f"{s['audio_s_per_visitor']:.1f} | {s['peak_memory_gib']:.1f} |"]
    if s.get("alone", {}).get("flow_vocoder_s_per_sentence_median") is not None:
        a = s["alone"]
        lines += ["", f"The same reply spoken alone: first audio {a['first_audio_p50_ms']:.0f} ms, RTF {a['rtf_max']:.2f}, "
                  f"per sentence talker {1000 * a['talker_s_per_sentence_median']:.0f} ms and flow + vocoder "
                  f"{1000 * a['flow_vocoder_s_per_sentence_median']:.0f} ms."]
    if s.get("flow_vocoder_s_per_sentence_median") is not None:
        lines += ["", f"Per sentence (median of {s['sentences']}): talker {1000 * s['talker_s_per_sentence_median']:.0f} "
                  f"ms (waiting for a row included), flow + vocoder {1000 * s['flow_vocoder_s_per_sentence_median']:.0f} "
                  f"ms; CUDA graph captures that failed and ran eagerly: {s['failed_graph_captures']}."]
    errors = [e for row in r["text"] + r.get("text_at_once", []) for e in row["errors"]] + s["errors"]
    if errors:
        lines += ["", "Errors: " + "; ".join(errors)]
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
