"""Train the streaming voice-activity model of examples/vad (seed 0, offline, about a minute).

Speech is synthesized with espeak-ng (Debian's ``espeak-ng`` package; no download),
resampled to 16 kHz and mixed into noise (white, pink, brown, mains hum, near silence)
at random levels and offsets. A stream is 32 chunks of 512 samples (1.02 s); each chunk
is labelled speech when the clean speech in it has an RMS above ``SPEECH_RMS``.

The model takes ``(audio [1, 512] float32 in [-1, 1), state [1, H] float32, sr int64
scalar)`` and returns ``(speech [1, 1] probability, stateN [1, H])``. Everything runs in
the graph: four 128-sample Hann-windowed frames, a real DFT as two MatMuls, power,
16 triangular mel-like bands, log, normalization folded into the first layer, and a GRU
cell written out as MatMul/Sigmoid/Tanh (so static int8 quantizes it). ``sr`` gates the
audio (``sr == 16000``), so a stream at another rate is never called speech. The device
feeds raw int16 PCM: ``edgepack.yaml`` embeds the int16 -> [-1, 1) scaling.

Writes model.onnx, calib.npz (8 streams) and val.npz (16 held-out streams: other
sentences, voices and noise seeds than training). Run: ``python examples/vad/train.py``.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RATE = 16000
CHUNK = 512
FRAME = 128
FRAMES = CHUNK // FRAME
BINS = FRAME // 2 + 1
BANDS = 16
HIDDEN = 24
CHUNKS_PER_STREAM = 32
SPEECH_RMS = 0.03
OPSET = 17

TRAIN_SENTENCES = [
    "the quick brown fox jumps over the lazy dog", "please turn on the kitchen light",
    "what time is it in tokyo right now", "set a timer for ten minutes", "my package should arrive tomorrow",
    "call me back when you are free", "the weather is lovely this afternoon", "open the garage door",
    "remind me to buy milk and bread", "how far is the nearest station", "play some quiet music please",
    "i would like a cup of tea", "the meeting starts at nine thirty", "lock the front door tonight",
    "send a message to my sister", "how many grams are in a pound", "switch the heating off",
    "good morning everyone", "read me the latest news", "is it going to rain later",
]
VAL_SENTENCES = [
    "the train to the city leaves at noon", "can you spell that for me", "water the plants on friday",
    "where did i leave my keys", "turn the volume down a little", "the museum is closed on mondays",
]
TRAIN_VOICES = ["en", "en-us", "en-gb-scotland", "de", "fr", "es", "it", "nl"]
VAL_VOICES = ["en-gb-x-rp", "pt", "sv", "pl"]


# --------------------------------------------------------------------------- speech and noise


def speak(text: str, voice: str, speed: int, pitch: int, tmp: Path) -> np.ndarray:
    """espeak-ng's speech at 16 kHz, float in [-1, 1]."""
    from scipy.signal import resample_poly

    out = tmp / "say.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(out), text],
                   check=True, capture_output=True)
    with wave.open(str(out)) as w:
        rate = w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float64) / 32768.0
    from math import gcd

    g = gcd(RATE, rate)
    speech = resample_poly(pcm, RATE // g, rate // g)
    return speech / max(1e-9, np.max(np.abs(speech)))


def noise(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    white = rng.standard_normal(n)
    if kind == "white":
        x = white
    elif kind == "pink":  # 1/f: filter white noise in the frequency domain
        spec = np.fft.rfft(white)
        spec /= np.sqrt(np.arange(1, spec.size + 1))
        x = np.fft.irfft(spec, n)
    elif kind == "brown":
        x = np.cumsum(white)
        x -= np.linspace(x[0], x[-1], n)
    elif kind == "hum":
        t = np.arange(n) / RATE
        x = sum(np.sin(2 * np.pi * 50 * k * t + rng.uniform(0, 6.28)) / k for k in (1, 2, 3)) + 0.05 * white
    else:  # near silence
        x = 0.01 * white
    return x / max(1e-9, np.std(x))


def make_streams(utterances: list[np.ndarray], count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``count`` int16 streams [count, chunks, CHUNK] and per-chunk labels [count, chunks]."""
    n = CHUNK * CHUNKS_PER_STREAM
    audio = np.zeros((count, n))
    labels = np.zeros((count, CHUNKS_PER_STREAM), dtype=np.int64)
    kinds = ["white", "pink", "brown", "hum", "silence"]
    for i in range(count):
        background = noise(kinds[i % len(kinds)], n, rng) * rng.choice([0.002, 0.01, 0.03, 0.06])
        clean = np.zeros(n)
        if i % 4 != 3:  # every fourth stream has no speech at all
            speech = utterances[rng.integers(len(utterances))]
            start = int(rng.integers(-len(speech) // 3, n - len(speech) // 3))
            lo, hi = max(0, start), min(n, start + len(speech))
            clean[lo:hi] = speech[lo - start:hi - start]
        gain = rng.uniform(0.15, 0.7)
        audio[i] = np.clip(background + gain * clean, -1, 32767 / 32768)
        rms = np.sqrt((clean.reshape(CHUNKS_PER_STREAM, CHUNK) ** 2).mean(axis=1))
        labels[i] = rms > SPEECH_RMS
    pcm = np.round(audio * 32768).clip(-32768, 32767).astype(np.int16)
    return pcm.reshape(count, CHUNKS_PER_STREAM, CHUNK), labels


# --------------------------------------------------------------------------- the fixed front end


def frontend_constants() -> dict[str, np.ndarray]:
    n = np.arange(FRAME)
    window = (0.5 - 0.5 * np.cos(2 * np.pi * n / FRAME)).astype(np.float32)
    k = np.arange(BINS)
    cos = (np.cos(2 * np.pi * np.outer(n, k) / FRAME) * window[:, None]).astype(np.float32)
    sin = (np.sin(2 * np.pi * np.outer(n, k) / FRAME) * window[:, None]).astype(np.float32)
    mel = lambda f: 2595 * np.log10(1 + f / 700)  # noqa: E731
    edges = 700 * (10 ** (np.linspace(mel(60), mel(RATE / 2), BANDS + 2) / 2595) - 1)
    freqs = k * RATE / FRAME
    bands = np.zeros((BINS, BANDS), dtype=np.float32)
    for b in range(BANDS):
        lo, mid, hi = edges[b], edges[b + 1], edges[b + 2]
        up = (freqs - lo) / (mid - lo)
        down = (hi - freqs) / (hi - mid)
        bands[:, b] = np.clip(np.minimum(up, down), 0, None)
    bands[:, bands.sum(axis=0) == 0] = 0
    return {"cos": cos, "sin": sin, "bands": bands, "floor": np.float32(1e-4)}


def features(audio: np.ndarray, c: dict[str, np.ndarray]) -> np.ndarray:
    """Log band energies [..., FRAMES * BANDS] of float chunks [..., CHUNK], as the graph computes them."""
    frames = audio.astype(np.float32).reshape(*audio.shape[:-1], FRAMES, FRAME)
    power = (frames @ c["cos"]) ** 2 + (frames @ c["sin"]) ** 2
    return np.log(power @ c["bands"] + c["floor"]).reshape(*audio.shape[:-1], FRAMES * BANDS).astype(np.float32)


# --------------------------------------------------------------------------- training


def train_gru(x: np.ndarray, y: np.ndarray, seed: int = 0, epochs: int = 60) -> dict[str, np.ndarray]:
    """A GRU over per-chunk features [streams, chunks, F] -> speech logits; BPTT over whole streams."""
    import torch

    torch.manual_seed(seed)
    mu, sd = x.reshape(-1, x.shape[-1]).mean(axis=0), x.reshape(-1, x.shape[-1]).std(axis=0) + 1e-3
    xt = torch.tensor((x - mu) / sd, dtype=torch.float32)
    yt = torch.tensor(y, dtype=torch.float32)
    f = x.shape[-1]
    wx = torch.nn.Linear(f, 3 * HIDDEN)
    wh = torch.nn.Linear(HIDDEN, 3 * HIDDEN)
    head = torch.nn.Linear(HIDDEN, 1)
    params = [*wx.parameters(), *wh.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=0.01)

    def cell(xs, h):
        gx, gh = wx(xs), wh(h)
        z = torch.sigmoid(gx[:, :HIDDEN] + gh[:, :HIDDEN])
        r = torch.sigmoid(gx[:, HIDDEN:2 * HIDDEN] + gh[:, HIDDEN:2 * HIDDEN])
        cand = torch.tanh(gx[:, 2 * HIDDEN:] + r * gh[:, 2 * HIDDEN:])
        return (1 - z) * cand + z * h

    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        order = torch.randperm(xt.shape[0], generator=gen)
        for start in range(0, xt.shape[0], 32):
            idx = order[start:start + 32]
            h = torch.zeros(len(idx), HIDDEN)
            loss = 0.0
            for t in range(xt.shape[1]):
                h = cell(xt[idx, t], h)
                loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(head(h)[:, 0], yt[idx, t])
            opt.zero_grad()
            (loss / xt.shape[1]).backward()
            opt.step()
        if epoch % 20 == 19:
            print(f"epoch {epoch + 1}: loss {loss.item() / xt.shape[1]:.4f}")
    with torch.no_grad():
        wx_w = wx.weight.numpy().T / sd[:, None]          # normalization folded into the first layer
        wx_b = wx.bias.numpy() - (mu / sd) @ wx.weight.numpy().T
        return {"wx": wx_w.astype(np.float32), "bx": wx_b.astype(np.float32),
                "wh": wh.weight.numpy().T.astype(np.float32), "bh": wh.bias.numpy().astype(np.float32),
                "wo": head.weight.numpy().T.astype(np.float32), "bo": head.bias.numpy().astype(np.float32)}


# --------------------------------------------------------------------------- ONNX


#: Outputs of the signal front end (gate, frames, DFT, power, bands, log): computed in float
#: by every variant, because int8 steps on quiet audio turn into large errors after the log.
FRONTEND = ("rate_ok", "gate", "gated", "frames", "re", "im", "re2", "im2", "power", "band_power", "floored",
            "logmel", "feat")


def build_onnx(w: dict[str, np.ndarray], c: dict[str, np.ndarray]):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in {
        **{k: v for k, v in c.items()}, **w,
        "frame_shape": np.array([FRAMES, FRAME], np.int64), "feat_shape": np.array([1, FRAMES * BANDS], np.int64),
        "rate": np.array(RATE, np.int64), "h1": np.array([HIDDEN], np.int64), "h2": np.array([2 * HIDDEN], np.int64),
        "h3": np.array([3 * HIDDEN], np.int64), "zero": np.array([0], np.int64), "axis1": np.array([1], np.int64),
        "one": np.array(1.0, np.float32),
    }.items()]
    def n(op, inputs, outputs, **attrs):
        # Named by stage: quantization.keep_float keeps "frontend/*" in float (edgepack.yaml).
        stage = "frontend" if outputs[0] in FRONTEND else "gru"
        return helper.make_node(op, inputs, outputs, name=f"{stage}/{outputs[0]}", **attrs)

    nodes = [
        n("Equal", ["sr", "rate"], ["rate_ok"]), n("Cast", ["rate_ok"], ["gate"], to=TensorProto.FLOAT),
        n("Mul", ["audio", "gate"], ["gated"]),
        n("Reshape", ["gated", "frame_shape"], ["frames"]),
        n("MatMul", ["frames", "cos"], ["re"]), n("MatMul", ["frames", "sin"], ["im"]),
        n("Mul", ["re", "re"], ["re2"]), n("Mul", ["im", "im"], ["im2"]), n("Add", ["re2", "im2"], ["power"]),
        n("MatMul", ["power", "bands"], ["band_power"]), n("Add", ["band_power", "floor"], ["floored"]),
        n("Log", ["floored"], ["logmel"]), n("Reshape", ["logmel", "feat_shape"], ["feat"]),
        n("MatMul", ["feat", "wx"], ["gx0"]), n("Add", ["gx0", "bx"], ["gx"]),
        n("MatMul", ["state", "wh"], ["gh0"]), n("Add", ["gh0", "bh"], ["gh"]),
        n("Slice", ["gx", "zero", "h2", "axis1"], ["gx_zr"]), n("Slice", ["gh", "zero", "h2", "axis1"], ["gh_zr"]),
        n("Add", ["gx_zr", "gh_zr"], ["zr_pre"]), n("Sigmoid", ["zr_pre"], ["zr"]),
        n("Slice", ["zr", "zero", "h1", "axis1"], ["z"]), n("Slice", ["zr", "h1", "h2", "axis1"], ["r"]),
        n("Slice", ["gx", "h2", "h3", "axis1"], ["gx_n"]), n("Slice", ["gh", "h2", "h3", "axis1"], ["gh_n"]),
        n("Mul", ["r", "gh_n"], ["r_gh"]), n("Add", ["gx_n", "r_gh"], ["n_pre"]), n("Tanh", ["n_pre"], ["cand"]),
        n("Sub", ["one", "z"], ["keep_new"]), n("Mul", ["keep_new", "cand"], ["new_part"]),
        n("Mul", ["z", "state"], ["old_part"]), n("Add", ["new_part", "old_part"], ["stateN"]),
        n("MatMul", ["stateN", "wo"], ["logit0"]), n("Add", ["logit0", "bo"], ["logit"]),
        n("Sigmoid", ["logit"], ["speech"]),
    ]
    graph = helper.make_graph(
        nodes, "vad",
        [helper.make_tensor_value_info("audio", TensorProto.FLOAT, [1, CHUNK]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, [1, HIDDEN]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("speech", TensorProto.FLOAT, [1, 1]),
         helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [1, HIDDEN])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="examples/vad/train.py")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def run_model(model, pcm: np.ndarray) -> np.ndarray:
    """Speech probabilities [streams, chunks] of int16 streams, state carried (onnxruntime)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = np.zeros(pcm.shape[:2], dtype=np.float32)
    for s in range(pcm.shape[0]):
        state = np.zeros((1, HIDDEN), np.float32)
        for t in range(pcm.shape[1]):
            audio = (pcm[s, t].astype(np.float32) * np.float32(1 / 32768))[None]
            speech, state = sess.run(None, {"audio": audio, "state": state, "sr": np.array(RATE, np.int64)})
            out[s, t] = speech[0, 0]
    return out


def main() -> None:
    import onnx

    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng is not installed (apt-get install espeak-ng); it synthesizes the training speech.")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        def utterances(sentences, voices):
            out = []
            for i, text in enumerate(sentences):
                for j, voice in enumerate(voices):
                    if (i + j) % 2 == 0:
                        out.append(speak(text, voice, int(rng.integers(120, 200)), int(rng.integers(25, 75)), Path(tmp)))
            return out

        train_utt = utterances(TRAIN_SENTENCES, TRAIN_VOICES)
        val_utt = utterances(VAL_SENTENCES, VAL_VOICES)
    print(f"{len(train_utt)} training and {len(val_utt)} held-out utterances")
    train_pcm, train_y = make_streams(train_utt, 320, rng)
    calib_pcm, calib_y = make_streams(train_utt, 8, np.random.default_rng(1))
    val_pcm, val_y = make_streams(val_utt, 16, np.random.default_rng(2))
    c = frontend_constants()
    x = features(train_pcm.astype(np.float32) / 32768, c)
    weights = train_gru(x, train_y)
    model = build_onnx(weights, c)
    onnx.save(model, HERE / "model.onnx")
    np.savez_compressed(HERE / "calib.npz", audio=calib_pcm, labels=calib_y)
    np.savez_compressed(HERE / "val.npz", audio=val_pcm, labels=val_y)
    probs = run_model(model, val_pcm)
    acc = float(np.mean((probs > 0.5) == val_y))
    print(f"held-out per-chunk accuracy {acc * 100:.2f}% on {val_y.size} chunks ({val_y.mean() * 100:.1f}% speech)")


if __name__ == "__main__":
    main()
