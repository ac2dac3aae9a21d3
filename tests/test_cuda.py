"""GPU paths against the plain CPU path (skipped without CUDA; run them on a lent GPU).

The CPU path is the one the parity tests pin to the reference; these tests pin the GPU-only techniques to it: the
CUDA-graph decode step and the grouped-GEMM experts."""

import os

import pytest
import torch

from ming.llm import Experts
from ming.modeling import MingOmni
from ming.testing.tiny import build_tiny_checkpoint, tiny_config
from ming.testing.weights import tiny_tensor

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPT = torch.tensor([[126340, 100, 200, 300, 126341, 126340, 5, 126341] * 3])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny")), with_speech=False)


def test_fp32_cuda_matches_cpu(tiny_dir):
    cpu = MingOmni.from_pretrained(tiny_dir, dtype=torch.float32, device="cpu")
    gpu = MingOmni.from_pretrained(tiny_dir, dtype=torch.float32, device="cuda")
    want = cpu(PROMPT).logits
    got = gpu(PROMPT).logits.cpu()
    assert ((got - want).norm() / want.norm()).item() < 1e-4
    assert torch.equal(cpu.generate(PROMPT, max_new_tokens=20), gpu.generate(PROMPT, max_new_tokens=20))


def test_bf16_graph_decode_matches_eager_decode(tiny_dir, monkeypatch):
    gpu = MingOmni.from_pretrained(tiny_dir, dtype=torch.bfloat16, device="cuda")
    graph = gpu.generate(PROMPT, max_new_tokens=20)
    # A second request reuses the captured step: the stale cache of the first must not leak in.
    graph_short = gpu.generate(PROMPT[:, :10], max_new_tokens=5)
    monkeypatch.setenv("MING_CUDA_GRAPHS", "0")
    assert torch.equal(gpu.generate(PROMPT, max_new_tokens=20), graph)
    assert torch.equal(gpu.generate(PROMPT[:, :10], max_new_tokens=5), graph_short)


def test_grouped_gemm_experts_match_the_loop_in_bf16():
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("grouped GEMM path is for sm90+")
    config = tiny_config().llm_config
    experts = Experts(config)
    experts.load_state_dict({k: tiny_tensor("e." + k, tuple(v.shape)) for k, v in experts.state_dict().items()})
    experts = experts.to("cuda", torch.bfloat16)
    x = torch.randn(37, config.hidden_size, device="cuda", dtype=torch.bfloat16)
    idx = torch.stack([torch.randperm(config.num_experts, device="cuda")[:3] for _ in range(37)])
    w = torch.rand(37, 3, device="cuda").softmax(-1)
    grouped = experts(x, idx, w)
    loop = experts.to(torch.float32)(x.float(), idx, w)
    err = ((grouped.float() - loop).norm() / loop.norm()).item()
    assert err < 2e-2, err


def bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to("cuda", torch.bfloat16)


def moe_problem(experts, top_k: int, tokens: int, seed: int, with_shared: bool = True, idx=None):
    """A routed MoE problem on `experts` (`tiny_experts()` or `full_size_experts()`): the bf16 CUDA arguments of
    kernels.moe_sorted / moe_one_row (x, topk_idx, topk_weight, the weights, the shared expert of width 2 I or
    None), a bf16 residual, and the float32 loop's result without the residual. `idx` [tokens, top_k] overrides the
    routing's expert choice (its weights stay)."""
    weights, cuda_weights = experts
    w_gate, w_up, w_down = weights
    E, I, H = w_gate.shape
    gen = torch.Generator().manual_seed(seed)
    shared = [torch.randn(shape, generator=gen) / shape[1] ** 0.5 for shape in ((2 * I, H), (2 * I, H), (H, 2 * I))]
    x = torch.randn(tokens, H, generator=gen)
    weight, chosen = torch.randn(tokens, E, generator=gen).softmax(-1).topk(top_k)
    weight = weight / weight.sum(-1, keepdim=True)
    chosen = chosen if idx is None else torch.tensor(idx)
    residual = torch.randn(tokens, H, generator=gen)
    loop = Experts(tiny_config().llm_config)
    loop.gate_proj.data, loop.up_proj.data, loop.down_proj.data = w_gate, w_up, w_down
    want = loop(x, chosen, weight)
    if with_shared:
        gate, up, down = shared
        want = want + (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T
    args = (bf16(x), chosen.cuda(), weight.cuda(), *cuda_weights, tuple(map(bf16, shared)) if with_shared else None)
    return args, bf16(residual), want


def tiny_experts():
    """The tiny model's stacked experts (gate, up [E, I, H], down [E, H, I]): float32 on the CPU, and in bf16 on
    the GPU."""
    experts = Experts(tiny_config().llm_config)
    experts.load_state_dict({k: tiny_tensor("e." + k, tuple(v.shape)) for k, v in experts.state_dict().items()})
    weights = experts.gate_proj.data, experts.up_proj.data, experts.down_proj.data
    return weights, tuple(map(bf16, weights))


def full_size_experts():
    """Random experts of the release's shapes (E=64, I=1408, H=2048), as `tiny_experts`."""
    gen = torch.Generator().manual_seed(64)
    weights = (torch.randn(64, 1408, 2048, generator=gen) / 45, torch.randn(64, 1408, 2048, generator=gen) / 45,
               torch.randn(64, 2048, 1408, generator=gen) / 38)
    return weights, tuple(map(bf16, weights))


def test_triton_decode_experts_match_the_loop_in_bf16():
    """The decode MoE kernels (rows sorted by expert, shared expert, residual) against the float32 loop, on the tiny
    shapes and on the full-size shapes (E=64, top-6, I=1408, shared 2816, H=2048), from one row to 64."""
    from ming import kernels

    tiny, full = tiny_experts(), full_size_experts()
    for experts, top_k, tokens in ((tiny, 3, 2), (tiny, 3, 37), (full, 6, 1), (full, 6, 16), (full, 6, 64)):
        args, residual, want = moe_problem(experts, top_k, tokens, seed=tokens)
        got = kernels.moe_sorted(*args, residual)
        err = ((got.float().cpu() - residual.float().cpu() - want).norm() / want.norm()).item()
        assert err < 2e-2, (tokens, err)
        assert torch.equal(kernels.moe_sorted(*args, residual), got)  # deterministic


def test_one_row_moe_matches_the_loop_in_bf16():
    """kernels.moe_one_row (the batch-1 step's MoE: expert ids read from the routing, two launches) against the
    float32 loop and against moe_sorted at one row: full-size and tiny shapes, with and without the shared expert and
    the residual, several routings, among them the first and last experts and one expert chosen twice."""
    from ming import kernels

    tiny, full = tiny_experts(), full_size_experts()
    cases = [(full, 6, seed, True, None) for seed in range(4)] + [
        (full, 6, 4, False, None),
        (full, 6, 5, True, [[63, 0, 1, 62, 31, 32]]),
        (full, 6, 6, True, [[7, 7, 8, 9, 10, 11]]),
        (tiny, 3, 7, True, None),
        (tiny, 3, 8, False, [[0, 0, 7]]),
    ]
    for experts, top_k, seed, with_shared, idx in cases:
        args, residual, want = moe_problem(experts, top_k, 1, seed, with_shared, idx)
        for res in (None, residual):
            got = kernels.moe_one_row(*args, res)
            assert got.shape == args[0].shape and got.dtype == args[0].dtype
            plain = got.float().cpu() - (0 if res is None else res.float().cpu())
            err = ((plain - want).norm() / want.norm()).item()
            assert err < 2e-2, (seed, res is None, err)
            sorted_ = kernels.moe_sorted(*args, res)
            assert ((got.float() - sorted_.float()).norm() / sorted_.float().norm()).item() < 1e-2, seed
            assert torch.equal(kernels.moe_one_row(*args, res), got)  # deterministic


def test_triton_gemv_matches_linear():
    from ming import kernels
    from ming.layers import RMSNorm

    x = torch.randn(3, 2048, device="cuda", dtype=torch.bfloat16)
    for n in (3072, 2048, 1000):
        w = torch.randn(n, 2048, device="cuda", dtype=torch.bfloat16) / 45
        torch.testing.assert_close(kernels.gemv(x, w), torch.nn.functional.linear(x, w), rtol=2e-2, atol=2e-2)
    norm = RMSNorm(2048, 1e-6).to("cuda", torch.bfloat16)
    norm.weight.data.uniform_(0.5, 1.5)
    got = kernels.gemv(x, w, (norm.weight, 1e-6), out_dtype=torch.float32)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.nn.functional.linear(norm(x), w).float(), rtol=2e-2, atol=2e-2)


def test_fused_add_norm_route_matches_torch():
    from ming import kernels
    from ming.layers import RMSNorm

    torch.manual_seed(0)
    x, delta = torch.randn(2, 3, 2048, device="cuda", dtype=torch.bfloat16)
    norm = RMSNorm(2048, 1e-6).to("cuda", torch.bfloat16)
    norm.weight.data.uniform_(0.5, 1.5)
    router = torch.randn(64, 2048, device="cuda", dtype=torch.bfloat16) / 45
    total, normed, idx, weight, swiglu = kernels.add_norm_route(x, delta, norm.weight, 1e-6, router, 6, True)
    assert swiglu is None
    want_total, want_normed = norm.add_and_norm(x, delta)
    assert torch.equal(total, want_total)
    torch.testing.assert_close(normed, want_normed, rtol=1e-2, atol=1e-2)
    want_weight, want_idx = torch.nn.functional.linear(want_normed, router).float().softmax(-1).topk(6)
    assert torch.equal(idx, want_idx)
    torch.testing.assert_close(weight, want_weight / want_weight.sum(-1, keepdim=True), rtol=1e-2, atol=1e-3)
    assert not kernels._tickets(x).any()
    # One row with the shared expert (width 2 x 1408): its SwiGLU, in rows 6.. of moe_one_row's input, as the
    # one-row MoE kernel computes it from the normed row.
    s_gate, s_up = torch.randn(2, 2816, 2048, device="cuda", dtype=torch.bfloat16) / 45
    one = x[:1], delta[:1]
    total, normed, idx, weight, swiglu = kernels.add_norm_route(*one, norm.weight, 1e-6, router, 6, True,
                                                                (s_gate, s_up), 1408)
    assert torch.equal(total, want_total[:1])
    torch.testing.assert_close(normed, want_normed[:1], rtol=1e-2, atol=1e-2)
    assert torch.equal(idx, want_idx[:1]) and swiglu.shape == (8, 1408)
    gate, up = (torch.nn.functional.linear(normed, w) for w in (s_gate, s_up))
    torch.testing.assert_close(swiglu[6:].reshape(1, -1), torch.nn.functional.silu(gate) * up, rtol=2e-2, atol=2e-2)
    assert not kernels._tickets(x).any()


def test_programmatic_dependent_launch_changes_no_bit(monkeypatch):
    """With programmatic dependent launch (sm90+) each decode kernel starts before the previous one ends and waits
    for its outputs inside: full-size layers (three of them, random weights) give bit-for-bit the logits they give
    without it, in CUDA graphs, at one row (the one-row MoE reads the routing before its wait) and at three."""
    import dataclasses

    from ming import kernels
    from ming.configs import RELEASE_CONFIG, MingConfig
    from ming.generation import DecodeStep
    from ming.llm import BailingMoeForCausalLM

    if not kernels.pdl(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs sm90+")
    config = dataclasses.replace(MingConfig.from_file(RELEASE_CONFIG).llm_config, num_hidden_layers=3)
    torch.manual_seed(0)
    llm = BailingMoeForCausalLM(config).to("cuda", torch.bfloat16)
    with torch.no_grad():
        for param in llm.parameters():
            if param.dim() == 1:  # norms
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0, 0.03)

    def decode(batch: int) -> torch.Tensor:
        step = DecodeStep(llm, batch, 1024, torch.bfloat16, torch.device("cuda"), capture=True)
        tokens = torch.randint(0, config.vocab_size, (40, batch), generator=torch.Generator().manual_seed(batch))
        logits = []
        for i, row in enumerate(tokens):
            slots = torch.full((batch,), i)
            logits.append(step(row, slots, slots, torch.ones(batch, dtype=torch.long)).clone())
        return torch.stack(logits)

    for batch in (1, 3):
        monkeypatch.setenv("MING_PDL", "1")
        with_pdl = decode(batch)
        monkeypatch.setenv("MING_PDL", "0")
        assert torch.equal(decode(batch), with_pdl), batch
        assert with_pdl.isfinite().all() and with_pdl.std() > 0


def test_triton_norm_rope_and_router_match_torch():
    from ming import kernels
    from ming.layers import RMSNorm, apply_rope, rope_cos_sin

    x = torch.randn(5, 2048, device="cuda", dtype=torch.bfloat16)
    delta = torch.randn_like(x)
    norm = RMSNorm(2048, 1e-6).to("cuda", torch.bfloat16)
    norm.weight.data.uniform_(0.5, 1.5)
    total, normed = kernels.rms_norm(x, norm.weight, 1e-6, delta=delta)
    want_total = x + delta
    want = norm.weight * (want_total.float() * torch.rsqrt(want_total.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
    assert torch.equal(total, want_total)
    torch.testing.assert_close(normed, want, rtol=1e-2, atol=1e-2)

    qkv = torch.randn(1, 3, 24, 128, device="cuda", dtype=torch.bfloat16)
    cos, sin = rope_cos_sin(torch.tensor([[7, 8, 9]], device="cuda"), 128, 600000.0)
    want_q = apply_rope(qkv.float().transpose(1, 2), cos, sin).transpose(1, 2)
    rotated = qkv.clone()
    k_cache, v_cache = torch.zeros(2, 1, 4, 16, 128, device="cuda", dtype=torch.bfloat16)
    kernels.rope_(rotated, cos, sin, 16, 4, (k_cache, v_cache), torch.tensor([5, 6, 7], device="cuda"))
    torch.testing.assert_close(rotated[:, :, :20].float(), want_q[:, :, :20], rtol=2e-2, atol=2e-2)
    assert torch.equal(rotated[:, :, 20:], qkv[:, :, 20:])
    assert torch.equal(k_cache[0, :, 5:8], rotated[0, :, 16:20].transpose(0, 1))
    assert torch.equal(v_cache[0, :, 5:8], qkv[0, :, 20:24].transpose(0, 1))
    assert not k_cache[:, :, :5].any() and not v_cache[:, :, 8:].any()

    # Decode attention (with its RoPE and cache write) against plain softmax: rows of different lengths in a
    # 1,024-slot and a 16,384-slot cache (a hole in one row; valid keys past a row's own slot are not seen:
    # attention is causal in slot order), the new key rotated and written with its value at each row's slot.
    for S, newest in ((1024, [299, 299]), (16384, [299, 15000, 0])):
        B = len(newest)
        qkv = torch.randn(B, 1, 24, 128, device="cuda", dtype=torch.bfloat16)
        kc, vc = torch.randn(2, B, 4, S, 128, device="cuda", dtype=torch.bfloat16)
        slots = torch.tensor(newest, device="cuda")
        cos, sin = rope_cos_sin(slots[:, None] + 7, 128, 600000.0)
        valid = torch.arange(S, device="cuda")[None] <= slots[:, None]
        valid[1, 10:20] = False
        seen = valid.clone()
        valid[0, 400:600] = True
        want_k, want_v = kc.clone(), vc.clone()
        rows = torch.arange(B, device="cuda")
        want_k[rows, :, slots] = apply_rope(qkv[:, :, 16:20].float().transpose(1, 2), cos, sin)[:, :, 0].bfloat16()
        want_v[rows, :, slots] = qkv[:, 0, 20:24]
        before = qkv.clone()
        got = kernels.decode_attention(qkv, cos, sin, kc, vc, valid, slots, 16)
        assert torch.equal(qkv, before)  # the projection is read, not rotated in place
        torch.testing.assert_close(kc, want_k, rtol=1e-2, atol=1e-2)
        assert torch.equal(vc, want_v)
        new = torch.zeros(B, S, dtype=torch.bool, device="cuda")
        new[rows, slots] = True
        assert torch.equal(kc.transpose(1, 2)[~new], want_k.transpose(1, 2)[~new])  # no other slot written
        q = apply_rope(qkv[:, :, :16].float().transpose(1, 2), cos, sin).view(B, 4, 4, 128)
        scores = (q @ want_k.float().transpose(-1, -2)) / 128**0.5
        probs = scores.masked_fill(~seen[:, None, None], float("-inf")).softmax(-1)
        want = (probs @ want_v.float()).view(B, 16, 128)
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)

    logits = torch.randn(4, 64, device="cuda")
    idx, weight = kernels.route_topk(logits, 6, renormalize=True)
    want_w, want_i = logits.softmax(-1).topk(6)
    assert torch.equal(idx, want_i)
    torch.testing.assert_close(weight, want_w / want_w.sum(-1, keepdim=True))


def test_bf16_generation_runs_with_graphs(tiny_dir):
    model = MingOmni.from_pretrained(tiny_dir, dtype=torch.bfloat16, device="cuda")
    stream = model.generate_stream(PROMPT, max_new_tokens=16)
    assert len(list(stream)) == 16 and stream.finish_reason == "length"
    assert os.environ.get("MING_CUDA_GRAPHS", "1") != "0"


def test_flow_decoder_and_vocoder_graphs_match_eager(tiny_dir, monkeypatch):
    """The Euler loop and the vocoder replayed from the graphs of a padded length give the eager, unpadded mel and
    waveform, and utterances of other lengths in the same bucket replay the same graphs."""
    import os

    from ming.speech.detokenizer import AudioDetokenizer

    from ming.testing.speech import write_tiny_speech_assets

    write_tiny_speech_assets(tiny_dir)
    # float32 convolutions in float32 (cuDNN's default TF32 rounds differently for the padded and unpadded shapes)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    detokenizer = AudioDetokenizer.from_pretrained(os.path.join(tiny_dir, "talker"), device="cuda")
    speaker = torch.randn(1, 192, generator=torch.Generator().manual_seed(1))

    def speak(length: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.randint(0, 4096, (1, length), generator=torch.Generator().manual_seed(length))
        mel = detokenizer.token_to_mel(tokens, speaker, generator=torch.Generator().manual_seed(2))
        return mel, detokenizer.mel_to_wave(mel, generator=torch.Generator().manual_seed(3))

    graphed = {length: speak(length) for length in (60, 47)}  # 103 and 80 mel frames: one bucket of 128
    assert list(detokenizer.flow.decoder.captured) == [(128, 8)] and list(detokenizer.hift.captured) == [128]
    monkeypatch.setenv("MING_CUDA_GRAPHS", "0")
    for length, (mel, wave) in graphed.items():
        eager_mel, eager_wave = speak(length)
        torch.testing.assert_close(mel, eager_mel, rtol=1e-4, atol=1e-4)
        assert wave.shape == eager_wave.shape
        # the same mel through both vocoder paths (the mels differ by rounding, which the vocoder would amplify)
        eager_wave = detokenizer.mel_to_wave(mel, generator=torch.Generator().manual_seed(3))
        monkeypatch.setenv("MING_CUDA_GRAPHS", "1")
        wave = detokenizer.mel_to_wave(mel, generator=torch.Generator().manual_seed(3))
        monkeypatch.setenv("MING_CUDA_GRAPHS", "0")
        torch.testing.assert_close(wave, eager_wave, rtol=1e-4, atol=1e-4)


def test_talker_graph_is_reused_across_replies_and_matches_eager(tiny_dir, monkeypatch):
    """Later replies replay the step captured for the first (no capture delay before their first sound), and
    speak exactly what eager steps speak."""
    from ming.speech import SpeechGenerator
    from ming.testing.speech import write_tiny_speech_assets

    write_tiny_speech_assets(tiny_dir)
    speech = SpeechGenerator.from_pretrained(tiny_dir, device="cuda")
    speaker = speech.voice_bank.get(speech.voices[0])
    thinker_states = torch.randn(1, 7, speech.talker.thinker_to_talker_proj.in_features, generator=torch.Generator().manual_seed(0))

    def reply(text: str, seed: int) -> list[int]:
        context = speech.talker.start(speaker.cuda(), thinker_states.cuda(), 200)
        return speech.talker.generate(context, text, torch.Generator().manual_seed(seed), 200)

    graphed = [reply("Hello there, how are you?", 0), reply("Fine, thanks.", 1)]
    steps = speech.talker.captured_steps
    assert len(steps) == 1
    graphed.append(reply("And you?", 2))
    assert speech.talker.captured_steps is steps and len(steps) == 1
    monkeypatch.setenv("MING_CUDA_GRAPHS", "0")
    eager = [reply("Hello there, how are you?", 0), reply("Fine, thanks.", 1), reply("And you?", 2)]
    assert graphed == eager


def test_engine_serves_every_kind_of_reply_on_the_gpu(monkeypatch):
    """The Space's serving path (serving.engine and serving.flows, as app.py calls them) on the GPU in bf16, with
    the tiny checkpoint, through the scheduler (a dedicated GPU) and one request per task (ZeroGPU): a chat turn
    with an image and a spoken reply, a second turn (graphs reused), image QA and thinking mode; both paths give the
    same greedy text."""
    pytest.importorskip("gradio")
    pytest.importorskip("spaces")
    from serving import engine, flows
    from serving.checks import sampling_config

    monkeypatch.setenv("MING_MODEL", "tiny")
    monkeypatch.setenv("MING_DEVICE", "cuda")
    monkeypatch.setenv("MING_SCHEDULER", "1")
    monkeypatch.setattr(engine, "_ENGINE", None)  # another test may have loaded the CPU engine in this process
    eng = engine.load_engine()
    assert eng.device.type == "cuda" and eng.model.dtype == torch.bfloat16 and eng.speech is not None
    image = os.path.join(os.path.dirname(__file__), "..", "examples", "images", "street.png")
    sampling = sampling_config(temperature=0.0, top_p=1.0, max_new_tokens=24)

    def every_kind() -> list[str]:
        turns, texts = [], []
        for text in ("What is in this picture?", "And what colour is it?"):
            updates = list(flows.chat(turns, text, [image] if not turns else [], "", sampling, True, eng.voices[0],
                                      "s"))
            turns, progress = updates[-1]
            assert progress.done and turns[-1].reply.strip() and turns[-1].reply_audio
            assert sum(p.audio is not None for _, p in updates) >= 1
            assert len(updates) >= 4  # streamed: the question, text deltas and audio chunks, then done
            texts.append(turns[-1].reply)
        answers = list(flows.vision_qa(image, None, "Describe it.", sampling, "s"))
        assert len(answers) >= 3 and answers[-1].strip()
        thought = list(flows.thinking([], "What is 2 + 2?", None, sampling, "s"))
        assert thought[-1][1].done and thought[-1][0][-1].reply.strip()
        return texts + [answers[-1], thought[-1][0][-1].reply]

    scheduled = every_kind()
    monkeypatch.setenv("MING_SCHEDULER", "0")
    eng.peak_active_jobs = 0
    assert every_kind() == scheduled
    assert eng.peak_active_jobs == 1


def test_scheduler_on_the_gpu_matches_each_request_alone(tiny_dir):
    """The scheduler with captured steps per batch bucket, in bf16: up to FEW_TOKENS rows (the GEMV kernels work
    row by row) each request gets exactly its tokens alone; 12 rows at once (cuBLAS projections) all finish, each
    at its own length; every row is free afterwards, and a second burst leaves GPU memory where the first did (the
    first pays one-time workspaces of kernels it is the first to use)."""
    import threading
    import time

    from ming.sampling import SamplingConfig
    from serving.scheduler import Scheduler

    model = MingOmni.from_pretrained(tiny_dir, dtype=torch.bfloat16, device="cuda")
    prompts = [torch.randint(0, 120000, (1, 5 + 7 * i), generator=torch.Generator().manual_seed(i)) for i in range(12)]
    configs = [SamplingConfig(max_new_tokens=10 + 3 * i) for i in range(12)]
    from ming.layers import FEW_TOKENS

    want = [list(model.generate_stream(ids, **cfg.__dict__)) for ids, cfg in zip(prompts[:FEW_TOKENS], configs)]
    scheduler = Scheduler(model, max_active=16, budget_bytes=64 * 2**20)

    def burst() -> int:
        results = [None] * 12

        def visitor(i: int) -> None:
            results[i] = list(scheduler.submit({"input_ids": prompts[i]}, configs[i]))

        threads = [threading.Thread(target=visitor, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert scheduler.peak_active > 8
        assert all(r is not None and 0 < len(r) <= c.max_new_tokens for r, c in zip(results, configs))
        deadline = time.time() + 5  # the loop thread may still be returning from its last turn
        while scheduler.active and time.time() < deadline:
            time.sleep(0.05)
        assert not scheduler.active and not scheduler.cache.valid.any()
        return torch.cuda.memory_allocated()

    try:
        streams = [scheduler.submit({"input_ids": ids}, cfg) for ids, cfg in zip(prompts[:FEW_TOKENS], configs)]
        assert [list(s) for s in streams] == want
        after_first = burst()
        assert burst() == after_first
    finally:
        scheduler.close()


def test_talker_fused_decode_matches_the_plain_path_in_bf16(tmp_path):
    """The talker's Triton decode (power-of-two cache) against its plain PyTorch decode (any other cache size), on
    a 2-layer talker with the 0.5B shape's heads (14 query heads of 64 over 2 KV heads: a group of 7)."""
    from ming.speech.talker import Talker, TalkerLMConfig, TalkerTokenizer
    from ming.testing.speech import write_text_tokenizer

    write_text_tokenizer(str(tmp_path))
    config = TalkerLMConfig(
        vocab_size=2048, hidden_size=896, intermediate_size=4864, num_hidden_layers=2, num_attention_heads=14,
        num_key_value_heads=2, rope_theta=1e6,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        talker = Talker(config, TalkerTokenizer.from_dir(str(tmp_path)), 64).to(torch.bfloat16)
    decoder = talker.model.model
    prefix = torch.randn(1, 37, 896, device="cuda", dtype=torch.bfloat16)
    outputs = []
    for dtype, capacity in ((torch.bfloat16, 1024), (torch.float32, 1000)):  # fused kernels, plain PyTorch
        decoder.to(dtype)
        cache = decoder.new_cache(capacity, dtype, torch.device("cuda"))
        decoder.prefill(prefix.to(dtype), cache)
        steps = [decoder.decode(prefix[:, i : i + 1].to(dtype) * 0.5, torch.tensor([37 + i], device="cuda"), cache)
                 for i in range(4)]
        outputs.append(torch.cat(steps, dim=1).float())
    fused, plain = outputs
    err = ((fused - plain).norm() / plain.norm()).item()
    assert err < 2e-2, err


def test_rope_writes_each_row_at_its_own_cache_slots():
    """kernels.rope_ with per-row cache positions [B, L] (the scheduler's decode step: rows at different points
    of their sequences) against the plain path: rotated q/k, and k/v written at each row's own slots and nowhere
    else. One slot list [L] for all rows still gives exactly what the same slots passed per row give."""
    from ming import kernels
    from ming.layers import apply_rope, rope_cos_sin, write_cache_

    B, L, H, KV, D, S = 3, 2, 16, 4, 128, 32
    qkv = torch.randn(B, L, H + 2 * KV, D, device="cuda", dtype=torch.bfloat16)
    slots = torch.tensor([[3, 4], [10, 11], [0, 1]], device="cuda")
    cos, sin = rope_cos_sin(slots + 5, D, 600000.0)
    rotated = qkv.clone()
    cache = torch.zeros(2, B, KV, S, D, device="cuda", dtype=torch.bfloat16)
    kernels.rope_(rotated, cos, sin, H, KV, (cache[0], cache[1]), slots)

    q, k, v = (t.float().transpose(1, 2) for t in qkv.split([H, KV, KV], dim=2))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    want = torch.zeros(2, B, KV, S, D, device="cuda")
    write_cache_((want[0], want[1]), slots, k, v)
    torch.testing.assert_close(rotated[:, :, :H].float(), q.transpose(1, 2), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(cache.float(), want, rtol=2e-2, atol=2e-2)
    assert torch.equal(cache.ne(0).any(-1), want.ne(0).any(-1)), "written at each row's slots, nowhere else"

    same = slots[0]
    cos, sin = rope_cos_sin(same.expand(B, L), D, 600000.0)
    outs = []
    for positions in (same, same.expand(B, L)):
        x, c = qkv.clone(), torch.zeros_like(cache)
        kernels.rope_(x, cos, sin, H, KV, (c[0], c[1]), positions)
        outs.append((x, c))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_replies_spoken_at_once_on_the_gpu_sound_as_each_alone(tmp_path):
    """SharedSpeech on the GPU (float32), where the talker speaks for every reply in rows of one cache with one
    captured step, and the flow decoder's graphs are shared: three replies spoken at once, each exactly its audio
    alone."""
    from ming.speech import SpeechGenerator
    from serving.scheduler import SharedSpeech
    from tests.test_scheduler import speak_together

    folder = build_tiny_checkpoint(str(tmp_path / "tiny"))
    speech = SpeechGenerator.from_pretrained(folder, device="cuda")
    speech.max_new_tokens = 12
    shared = SharedSpeech(speech)
    replies = [(["Hello there. ", "How are you today? ", "Fine, thanks."],
                torch.randn(1, 5 + i, 64, generator=torch.Generator().manual_seed(i)).cuda(), 10 * i) for i in range(3)]
    alone, together = speak_together(speech, shared, replies)
    for a, b in zip(alone, together):
        assert len(a) > 0 and (a == b).all()
    assert shared.speech.talker.peak_speaking > 1
    shared.close()


def test_most_likely_matches_argmax_on_the_gpu():
    from ming.sampling import most_likely

    logits = torch.randn(5, 126464, device="cuda")
    logits[1, 10] = logits[1, 126000] = 100.0
    assert torch.equal(most_likely(logits), logits.argmax(-1))
