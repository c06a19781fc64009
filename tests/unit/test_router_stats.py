"""Per-shard router statistics: chunking, routing quality, isolation and safetensors I/O."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import load, save

from adapterswap.config import RouterSettings
from adapterswap.models.embedder import EMBEDDED_MODEL_ID
from adapterswap.route.stats import (
    FORMAT,
    KERNEL_BANDWIDTH,
    ShardStats,
    chunk_text,
    compute_shard_stats,
    fit_shard_stats,
    load_shard_stats,
    save_shard_stats,
    score_shards,
)

TOPICS: dict[str, list[str]] = {
    "payroll": [
        "Salaries are paid on the last working day of each month. If that day is a bank holiday, the transfer goes out the day before.",
        "Overtime must be approved by your line manager in the time-tracking tool before the 20th, otherwise it rolls over to next month's payslip.",
        "Your payslip lists gross pay, income tax withheld, social security contributions and the pension deduction as separate lines.",
        "New starters should send their tax identification number and bank details to HR during the first week so the first salary is not delayed.",
        "Expense reimbursements are added to the regular salary run; receipts older than ninety days cannot be refunded.",
        "The annual bonus is calculated from company results and individual targets and appears on the March payslip.",
        "If you change your bank account, update it in the employee portal at least ten days before payday.",
        "Part-time staff accrue holiday pay pro rata, and unused leave is paid out with the final salary when someone leaves.",
    ],
    "firmware": [
        "To flash the new firmware, hold the reset button while connecting the board over USB until the bootloader LED blinks.",
        "The image must be signed with the production key; the bootloader rejects unsigned binaries and falls back to the previous slot.",
        "Version 2.4 fixes a watchdog timeout that rebooted the controller when the flash write took longer than expected.",
        "Over-the-air updates download into the inactive partition and only switch after the checksum has been verified.",
        "If the device bricks during an update, connect a JTAG probe and reload the recovery image at address 0x08000000.",
        "The microcontroller's EEPROM keeps calibration constants, so a firmware upgrade does not erase sensor offsets.",
        "Build the firmware with the cross-compiler toolchain and run the hardware-in-the-loop tests before tagging a release.",
        "Interrupt handlers should stay short; defer heavy work to the main loop to avoid missing UART bytes.",
    ],
    "sailing": [
        "When the wind picks up, reef the mainsail early rather than waiting until the boat is heeling hard.",
        "Tacking means turning the bow through the wind; call 'ready about' so the crew can prepare the jib sheets.",
        "Check the tide tables before leaving the harbour, since the current at the channel entrance can run at three knots.",
        "A bowline makes a fixed loop that will not slip and is easy to untie even after it has been loaded.",
        "On a broad reach, ease the sails out until they just stop luffing and keep the boom vang snug.",
        "Before a passage, inspect the rigging, shrouds and turnbuckles for corrosion or loose cotter pins.",
        "Right of way: a boat on starboard tack has priority over one on port tack when their courses cross.",
        "Anchoring overnight needs a scope of at least five times the depth and a check that the anchor has set.",
    ],
    "cooking": [
        "Brown the onions slowly over medium heat for twenty minutes until they turn sweet and golden.",
        "Season the pasta water generously with salt; it should taste like the sea before the spaghetti goes in.",
        "Let the roast chicken rest for ten minutes after it leaves the oven so the juices settle back into the meat.",
        "A risotto needs warm stock added one ladle at a time while you stir the rice constantly.",
        "Toast whole spices in a dry pan until fragrant, then grind them for a curry paste.",
        "Deglaze the pan with a splash of wine to lift the browned bits for the sauce.",
        "Blanch green beans for two minutes and plunge them into ice water to keep them bright.",
        "Marinate the tofu in soy sauce, garlic and ginger for an hour before frying it until crisp.",
    ],
}

QUERIES: dict[str, list[str]] = {
    "payroll": [
        "When will I receive my salary this month?",
        "Why is there less money on my payslip than I expected?",
        "How do I get reimbursed for a train ticket I paid for a work trip?",
        "Who do I tell about my new IBAN so wages go to the right account?",
        "Is overtime paid in the same month I worked it?",
    ],
    "firmware": [
        "How do I update the board's software from my laptop?",
        "The device stopped booting halfway through an upgrade, how can I recover it?",
        "Why does the bootloader refuse my binary?",
        "Does upgrading wipe the calibration data stored on the chip?",
        "What causes the controller to reset itself during writes to flash?",
    ],
    "sailing": [
        "How much anchor chain should I let out in ten metres of water?",
        "What should I do with the sails when a squall approaches?",
        "Which boat has to give way when two yachts meet on opposite tacks?",
        "What knot should I use to tie a loop at the end of a mooring line?",
        "How do I trim the jib when sailing downwind?",
    ],
    "cooking": [
        "How long should I rest a steak before slicing it?",
        "How do I make a creamy risotto without it going gluey?",
        "What's the best way to caramelise onions?",
        "How can I keep vegetables green after boiling them?",
        "How do I make a pan sauce after searing meat?",
    ],
}

BREAD = [
    "Feed the sourdough starter with equal weights of flour and water and wait until it doubles before mixing the dough.",
    "Bulk fermentation of a sourdough loaf takes four to six hours; do stretch-and-folds every half hour to build gluten.",
    "Bake the boule in a preheated Dutch oven with the lid on for twenty minutes so steam gives the crust a good oven spring.",
]

KITCHEN_POOL = [
    "Keep your knives sharp; a dull blade slips and is more dangerous than a sharp one.",
    "Store fresh herbs like a bouquet in a glass of water in the fridge.",
    "Cast iron pans should be dried on the stove and rubbed with a thin film of oil.",
    "A meat thermometer is the only reliable way to know when poultry is cooked through.",
    "Freeze leftover stock in ice cube trays for quick sauces later.",
    "Use a wooden spoon for nonstick pans to avoid scratching the coating.",
    "Salt the eggplant slices and let them drain to remove bitterness before frying.",
    "Cook dried beans in plenty of water and add salt only near the end.",
    "Citrus zest adds brightness to dressings and marinades.",
    "Let the oil shimmer in the wok before adding the vegetables for a proper stir-fry.",
    "Soups taste better the next day once the flavours have melded.",
    "Simmer tomato sauce for at least half an hour to mellow its acidity.",
    "Pat fish fillets dry so the skin crisps instead of steaming.",
    "Whisk vinaigrette with mustard so the oil and vinegar stay emulsified.",
    "Chop onions with the root end intact to keep the layers together.",
    "Poach eggs in barely simmering water with a splash of vinegar.",
    "Rinse rice until the water runs clear for fluffier grains.",
    "Roast vegetables in a single layer at high heat so they caramelise.",
    "Shred cabbage finely for coleslaw and dress it an hour before serving.",
    "Grate hard cheese just before serving so it keeps its aroma.",
]
KITCHEN = [
    f"{a} {b}" for a, b in zip(KITCHEN_POOL, KITCHEN_POOL[1:] + KITCHEN_POOL[:1], strict=True)
] + [
    f"{a} {b}" for a, b in zip(KITCHEN_POOL[::-1], KITCHEN_POOL[7:] + KITCHEN_POOL[:7], strict=True)
]


@pytest.fixture(scope="module")
def topic_stats(embed) -> dict[str, ShardStats]:
    return {
        name: compute_shard_stats(docs, embed, EMBEDDED_MODEL_ID) for name, docs in TOPICS.items()
    }


@pytest.fixture(scope="module")
def stats_bytes(topic_stats) -> bytes:
    return save_shard_stats(topic_stats["sailing"])


# --- chunking ----------------------------------------------------------------------------------


def test_chunk_text_short_blank_and_whitespace():
    assert chunk_text("") == []
    assert chunk_text("   \n\t ") == []
    assert chunk_text("  one   two\nthree ") == ["one two three"]
    assert chunk_text(" ".join(["w"] * 64)) == [" ".join(["w"] * 64)]


def test_chunk_text_windows_overlap_and_cover_every_word():
    words = [f"w{i}" for i in range(150)]
    chunks = chunk_text(" ".join(words), max_words=64, overlap=16)
    assert [c.split()[0] for c in chunks] == ["w0", "w48", "w96"]
    assert chunks[-1].split()[-1] == "w149"
    assert all(len(c.split()) <= 64 for c in chunks)
    assert chunks[0].split()[-16:] == chunks[1].split()[:16]
    assert chunk_text(" ".join(words[:65]), max_words=64, overlap=16)[1].split()[0] == "w48"
    assert chunk_text("a b c", max_words=1, overlap=0) == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"max_words": 0}, "max_words: must be ≥ 1"), ({"overlap": 64}, "overlap: must be in"),
     ({"overlap": -1}, "overlap: must be in")],
)  # fmt: skip
def test_chunk_text_rejects_bad_windows(kwargs, match):
    with pytest.raises(ValueError, match=match):
        chunk_text("a b c", **kwargs)


# --- routing quality ---------------------------------------------------------------------------


def _accuracy(scores: np.ndarray, truth: list[int]) -> float:
    return float((scores.argmax(axis=1) == np.array(truth)).mean())


def test_routing_accuracy_beats_threshold_and_is_reported(embed, topic_stats):
    names = list(topic_stats)
    stats = [topic_stats[n] for n in names]
    queries = [q for n in names for q in QUERIES[n]]
    truth = [i for i, n in enumerate(names) for _ in QUERIES[n]]
    q = embed(queries)
    scores = score_shards(q, stats, embedder_id=EMBEDDED_MODEL_ID)
    kernel = _accuracy(scores, truth)
    print(f"\nrouting top-1 over {len(queries)} queries: {kernel:.2f}")
    assert kernel >= 0.9
    # The relevant shard scores above any chit-chat, which the coverage gate keeps off every
    # adapter. (Heavy paraphrases score 0.26-0.63 here: the gate's price, benchmarks/eval_harm.py.)
    relevant = scores[np.arange(len(truth)), truth]
    off_topic = embed(["What's the weather like in Paris today?", "Tell me a joke", "hello"])
    chit_chat = score_shards(off_topic, stats)
    assert (relevant > chit_chat.max()).mean() >= 0.9
    assert (chit_chat < RouterSettings().min_score).all()


def test_posterior_is_sensible_at_router_temperature(embed, topic_stats):
    stats = list(topic_stats.values())
    scores = score_shards(embed(["How do I reef the main in strong wind?"])[0], stats)
    logits = scores / 0.05  # RouterSettings.temperature default
    post = np.exp(logits - logits.max())
    post /= post.sum()
    print(f"\nposterior for a sailing query: {np.round(post, 3)}")
    assert post.argmax() == list(topic_stats).index("sailing")
    assert 0.5 < post.max() <= 1.0


def test_small_shard_is_not_drowned_by_a_large_similar_one(embed):
    small = compute_shard_stats(BREAD, embed, EMBEDDED_MODEL_ID)
    large = compute_shard_stats(KITCHEN, embed, EMBEDDED_MODEL_ID)
    assert (small.n_chunks, large.n_chunks) == (3, 40)
    queries = [
        "My sourdough starter is not bubbling, when is it ready to use for a loaf?",
        "How do I get a crisp crust and good oven spring when baking bread at home?",
    ]
    scores = score_shards(embed(queries), [small, large])
    assert (scores.argmax(axis=1) == 0).all(), scores
    kitchen_query = embed(["How should I look after my cast iron skillet?"])[0]
    assert score_shards(kitchen_query, [small, large]).argmax() == 1


# --- isolation (invariant 1) -------------------------------------------------------------------


def test_stats_depend_only_on_their_own_shard(embed):
    alone = save_shard_stats(compute_shard_stats(TOPICS["payroll"], embed, EMBEDDED_MODEL_ID))
    compute_shard_stats(TOPICS["firmware"], embed, EMBEDDED_MODEL_ID)  # fit another shard first
    after_other = save_shard_stats(compute_shard_stats(TOPICS["payroll"], embed, EMBEDDED_MODEL_ID))
    assert alone == after_other


def test_score_of_a_shard_is_unchanged_by_other_shards(embed, topic_stats):
    q = embed(["When is payday?", "How do I flash the bootloader?"])
    a = topic_stats["payroll"]
    just_a = score_shards(q, [a])[:, 0]
    with_others = score_shards(q, [topic_stats["sailing"], a, topic_stats["firmware"]])[:, 1]
    np.testing.assert_array_equal(just_a, with_others)


# --- fitting edge cases ------------------------------------------------------------------------


def test_fit_normalises_rows_and_scores_on_the_cosine_scale():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 16)) * np.arange(1, 6)[:, None]
    stats = fit_shard_stats(x, "e")
    assert (stats.n_chunks, stats.dim) == (5, 16) and not stats.chunks.flags.writeable
    np.testing.assert_allclose(np.linalg.norm(stats.chunks, axis=1), 1.0, rtol=1e-6)
    one = fit_shard_stats(x[:1], "e")  # a one-chunk shard scores its own direction at cosine 1
    assert score_shards(x[0] * 3.0, [one])[0] == pytest.approx(1.0)
    # The soft maximum lies between the mean and the max cosine, near the max for a sharp τ.
    q = rng.normal(size=16)
    cos = stats.chunks.astype(np.float64) @ (q / np.linalg.norm(q))
    score = score_shards(q, [stats])[0]
    assert cos.mean() <= score <= cos.max()
    assert score == pytest.approx(KERNEL_BANDWIDTH * np.log(np.exp(cos / KERNEL_BANDWIDTH).mean()))


def test_fit_and_score_reject_bad_inputs(topic_stats):
    with pytest.raises(ValueError, match="expected shape"):
        fit_shard_stats(np.zeros((0, 4)), "e")
    with pytest.raises(ValueError, match="NaN or infinite"):
        fit_shard_stats(np.full((2, 4), np.nan), "e")
    with pytest.raises(ValueError, match="all zeros"):
        fit_shard_stats(np.zeros((2, 4)), "e")
    with pytest.raises(ValueError, match="dim 5 does not match"):
        score_shards(np.ones(5), list(topic_stats.values()))
    with pytest.raises(ValueError, match="embedder_id: query embedded by 'other'"):
        score_shards(np.ones(384), list(topic_stats.values()), embedder_id="other")
    with pytest.raises(ValueError, match="no non-blank text"):
        compute_shard_stats(["  "], lambda t: np.zeros((len(t), 4)), "e")


# --- serialisation -----------------------------------------------------------------------------


def test_round_trip_is_exact(topic_stats, stats_bytes):
    original = topic_stats["sailing"]
    loaded = load_shard_stats(stats_bytes)
    np.testing.assert_array_equal(loaded.chunks, original.chunks)
    for name in ("n_chunks", "dim", "embedder_id"):
        assert getattr(loaded, name) == getattr(original, name)
    assert save_shard_stats(loaded) == stats_bytes


def test_payload_is_plain_safetensors(stats_bytes):
    (length,) = struct.unpack("<Q", stats_bytes[:8])
    header = json.loads(stats_bytes[8 : 8 + length])
    n = json.loads(header["__metadata__"][FORMAT])["n_chunks"]
    assert header["chunks"]["dtype"] == "F32" and header["chunks"]["shape"] == [n, 384]
    assert json.loads(header["__metadata__"][FORMAT])["embedder_id"] == EMBEDDED_MODEL_ID
    assert b"pickle" not in stats_bytes and set(load(stats_bytes)) == {"chunks"}


def test_serialisation_is_deterministic(embed):
    a = save_shard_stats(compute_shard_stats(TOPICS["cooking"], embed, EMBEDDED_MODEL_ID))
    b = save_shard_stats(compute_shard_stats(TOPICS["cooking"], embed, EMBEDDED_MODEL_ID))
    assert a == b


def _meta(data: bytes) -> dict[str, str]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length])["__metadata__"]


def _chunks(data: bytes, fill: float | None = None) -> np.ndarray:
    chunks = load(data)["chunks"].copy()
    if fill is not None:
        chunks[0, 0] = fill
    return chunks


def _resave(data: bytes, **changes: np.ndarray) -> bytes:
    return save({**load(data), **changes}, metadata=_meta(data))


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (lambda b: b[:5], "not a shard-stats safetensors payload"),
        (lambda b: b"\xff" * 64, "not a shard-stats safetensors payload"),
        (lambda b: b[:-7], "not a valid safetensors payload"),
        (lambda b: save({"x": np.zeros(2, np.float32)}), "not a shard-stats"),
        (lambda b: _resave(b, chunks=_chunks(b, np.nan)), "'chunks' contains NaN"),
        (lambda b: _resave(b, chunks=_chunks(b)[:, :383]), "'chunks' has shape \\(\\d+, 383\\)"),
        (lambda b: _resave(b, chunks=_chunks(b)[:1]), "'chunks' has shape \\(1, 384\\)"),
        (lambda b: _resave(b, chunks=_chunks(b).astype(np.float64)), "'chunks' has shape .* float64"),
        (lambda b: _resave(b, chunks=_chunks(b) * 2), "must be unit-norm"),
        (lambda b: save({"other": _chunks(b)}, metadata=_meta(b)), "missing tensor 'chunks'"),
    ],
)  # fmt: skip
def test_load_rejects_corrupt_payloads(stats_bytes, corrupt, match):
    with pytest.raises(ValueError, match=match):
        load_shard_stats(corrupt(stats_bytes))


def test_load_rejects_bad_metadata(stats_bytes):
    tensors = load(stats_bytes)
    meta = json.loads(_meta(stats_bytes)[FORMAT])
    for key, value, match in [("version", 1, "version 1 is not supported"),
                              ("dim", "384", "'dim' must be a positive int"),
                              ("embedder_id", None, "'embedder_id' must be a string")]:  # fmt: skip
        data = save(tensors, metadata={FORMAT: json.dumps({**meta, key: value})})
        with pytest.raises(ValueError, match=match):
            load_shard_stats(data)
