"""The transformers engine decides every tick in the decision format, even with random weights; with the
demo model it speaks when a red disc is in the current frame and stays silent otherwise, batched or not; and a
model that cannot be loaded falls back to the demo model (or fails saying what was tried), within seconds."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from actors.common.config import VigilConfig
from actors.common.decisions import RESPONSE, SILENCE
from actors.common.messages import Sample, TickRequest, Turn
from actors.interaction.engine import EngineError
from actors.interaction.engines.transformers import DecisionConstraint, TransformersEngine, load_engine, prepare_model
from actors.interaction.models.demo import DEMO_MODEL_NAME, DEMO_NOTE, demo_answer, render_frame

pytestmark = pytest.mark.unit

# Frame sizes as the sampler delivers them (longest side at most 448), for frames the demo model never saw.
HELD_OUT_SIZES = ((448, 252), (320, 240), (224, 224), (252, 448), (160, 120))


def window(
    rng: np.random.Generator, discs: list[bool], size: tuple[int, int], start: float = 30.0
) -> TickRequest:
    """A tick whose short-term window shows `discs` (oldest first), with the demo model's past answers."""
    width, height = size
    samples = tuple(
        Sample(start + i, width, height, render_frame(width, height, disc, rng).tobytes())
        for i, disc in enumerate(discs)
    )
    dialog = tuple(Turn("assistant", demo_answer(disc), start + i) for i, disc in enumerate(discs[:-1]))
    return TickRequest(
        session_id="s",
        tick=int(samples[-1].stream_time),
        stream_time=samples[-1].stream_time,
        samples=samples,
        instructions=("Tell me when you see a red disc.",),
        dialog=dialog,
    )


@pytest.fixture
async def tiny_engine(tiny_random_model_dir: Path) -> AsyncIterator[TransformersEngine]:
    engine = TransformersEngine(str(tiny_random_model_dir), max_new_tokens=12)
    await engine.start()
    yield engine
    engine.close()


@pytest.fixture
async def demo_engine(demo_model_dir: Path) -> AsyncIterator[TransformersEngine]:
    engine = TransformersEngine(str(demo_model_dir))
    await engine.start()
    yield engine
    engine.close()


def test_constraint_spells_a_prefix_then_ends_silence_and_lets_a_response_speak() -> None:
    silence, response, stop = [1, 2, 3], [1, 4, 3], [9, 8]
    constraint = DecisionConstraint({SILENCE: silence, RESPONSE: response}, prompt_length=0, stop_ids=stop)
    assert constraint.step([]) == ([1], None)
    allowed, banned = constraint.step([1])
    assert sorted(allowed or []) == [2, 4] and banned is None
    assert constraint.step([1, 2]) == ([3], None)
    assert constraint.step([1, 2, 3]) == ([9], None)  # silence ends the turn at once
    assert constraint.step([1, 4, 3]) == (None, stop)  # a response must say something
    assert constraint.step([1, 4, 3, 7]) == (None, None)  # then it is free


@pytest.mark.parametrize("batch_size", [1, 3])
async def test_random_weights_still_decide_in_the_decision_format(
    tiny_engine: TransformersEngine, batch_size: int
) -> None:
    rng = np.random.default_rng(batch_size)
    requests = [window(rng, [False] * (1 + i % 3), HELD_OUT_SIZES[i]) for i in range(batch_size)]
    decisions = await tiny_engine.decide(requests)
    assert len(decisions) == batch_size
    for decision in decisions:
        assert decision.kind in ("silent", "respond", "delegate")
        assert decision.raw.startswith((SILENCE, RESPONSE))
        assert decision.model_ms > 0
        if decision.raw.startswith(SILENCE):
            assert decision.raw == SILENCE


async def test_engine_must_be_started(tiny_random_model_dir: Path) -> None:
    engine = TransformersEngine(str(tiny_random_model_dir))
    with pytest.raises(EngineError, match="not been started"):
        await engine.check_health()
    await engine.start()
    await engine.check_health()
    assert engine.info().model == str(tiny_random_model_dir) and not engine.info().demo
    assert engine.info().image_pixels == 112 * 112  # its processor's budget, which the ingest sizes frames to
    engine.close()


async def test_demo_model_speaks_only_when_the_current_frame_shows_the_disc(
    demo_engine: TransformersEngine,
) -> None:
    rng = np.random.default_rng(2024)
    cases: list[tuple[TickRequest, bool]] = []
    for i in range(20):
        size = HELD_OUT_SIZES[i % len(HELD_OUT_SIZES)]
        cases.append((window(rng, [True], size), True))
        cases.append((window(rng, [False], size), False))
        # Earlier frames showed the disc (and the model said so) but the current one does not.
        cases.append((window(rng, [True, True, False], size), False))
        cases.append((window(rng, [False, False, True], size), True))
    decisions = await demo_engine.decide([request for request, _ in cases])
    by_case: dict[str, list[bool]] = {"disc": [], "none": [], "disc_gone": [], "disc_new": []}
    for index, ((_, disc), decision) in enumerate(zip(cases, decisions, strict=True)):
        name = ("disc", "none", "disc_gone", "disc_new")[index % 4]
        by_case[name].append(decision.kind == ("respond" if disc else "silent"))
        if decision.kind == "respond":
            assert decision.text == "I see a red disc."
    for name, right in by_case.items():
        assert sum(right) >= 19, f"{name}: {sum(right)}/20 right"
    assert demo_engine.info().demo and demo_engine.info().note == DEMO_NOTE
    assert demo_engine.info().image_pixels == 112 * 112


async def test_memory_in_the_prompt_does_not_sway_the_demo_model(demo_engine: TransformersEngine) -> None:
    """Memory lines and a recalled old scene with a disc in it: the current frame still decides."""
    rng = np.random.default_rng(77)
    memories = ("at 00:00:05 you said: I see a red disc.", "at 00:00:07 the user said: is it still there?")
    cases: list[tuple[TickRequest, bool]] = []
    for i in range(20):
        width, height = HELD_OUT_SIZES[i % len(HELD_OUT_SIZES)]
        old_disc = Sample(5.0, width, height, render_frame(width, height, True, rng).tobytes())
        for disc in (False, True):
            request = window(rng, [disc], (width, height), start=90.0 + i)
            cases.append((dataclasses.replace(request, memories=memories, lookback=(old_disc,)), disc))
    decisions = await demo_engine.decide([request for request, _ in cases])
    right = [decision.kind == ("respond" if disc else "silent") for (_, disc), decision in zip(cases, decisions,
                                                                                              strict=True)]
    assert sum(right) >= 38, f"{sum(right)}/40 right with memory in the prompt"


async def test_a_batch_decides_as_its_requests_one_by_one(demo_engine: TransformersEngine) -> None:
    rng = np.random.default_rng(7)
    requests = [
        window(rng, [bool(flag) for flag in rng.random(1 + i % 3) < 0.5], HELD_OUT_SIZES[i % 5])
        for i in range(6)
    ]
    alone = [(await demo_engine.decide([request]))[0] for request in requests]
    together = await demo_engine.decide(requests)
    assert [d.raw for d in together] == [d.raw for d in alone]
    assert [d.probability for d in together] == pytest.approx([d.probability for d in alone], abs=1e-4)


class GenerateCounter:
    """Wraps a model's `generate` to count calls and the rows each call was given."""

    def __init__(self, engine: TransformersEngine) -> None:
        self.rows: list[int] = []
        self._generate = engine._model.generate
        engine._model.generate = self

    def __call__(self, **kwargs):  # type: ignore[no-untyped-def]
        self.rows.append(int(kwargs["input_ids"].shape[0]))
        return self._generate(**kwargs)


async def test_silent_ticks_generate_nothing_and_only_speakers_are_worded(
    demo_engine: TransformersEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(11)
    counter = GenerateCounter(demo_engine)
    try:
        silent = [window(rng, [False], HELD_OUT_SIZES[i]) for i in range(4)]
        decisions = await demo_engine.decide(silent)
        assert [d.kind for d in decisions] == ["silent"] * 4 and counter.rows == []
        assert all(d.raw == SILENCE and d.probability > 0.5 for d in decisions)
        mixed = [window(rng, [i % 2 == 0], HELD_OUT_SIZES[i]) for i in range(5)]
        decisions = await demo_engine.decide(mixed)
        assert [d.kind for d in decisions] == ["respond", "silent", "respond", "silent", "respond"]
        assert counter.rows == [3]  # one generate call, for the three rows that speak
        assert all(d.probability > 0.5 for d in decisions)
    finally:
        demo_engine._model.generate = counter._generate


async def test_the_sessions_threshold_decides_how_sure_it_must_be_to_speak(demo_engine: TransformersEngine) -> None:
    rng = np.random.default_rng(12)
    disc, none = window(rng, [True], (320, 240)), window(rng, [False], (320, 240))
    [sure, unsure] = await demo_engine.decide([disc, none])
    p_disc, p_none = sure.probability, 1.0 - unsure.probability
    assert p_disc > 0.9 > 0.1 > p_none
    # A session that wants certainty beyond what the model gives stays silent, even with the disc in view.
    [cautious] = await demo_engine.decide([dataclasses.replace(disc, speak_threshold=1.0)])
    assert cautious.kind == "silent" and cautious.probability == pytest.approx(1.0 - p_disc, abs=1e-4)
    # A session that asks for every remark hears one at a threshold below the model's P(speak).
    [eager] = await demo_engine.decide([dataclasses.replace(none, speak_threshold=p_none / 2)])
    assert eager.kind == "respond" and eager.text and eager.probability == pytest.approx(p_none, abs=1e-4)


def save_tiny_llava(directory: Path) -> Path:
    """A tiny random LLaVA (CLIP vision tower, Llama text model) with its processor: an architecture outside
    the Qwen-VL family, which the engine must run through the model's own AutoProcessor."""
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from actors.interaction.models.tiny_vlm import build_tokenizer

    template = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
        "{% else %}{{ part['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.chat_template = template
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=template,
    )
    tiny = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**tiny, image_size=28, patch_size=14),
        text_config=LlamaConfig(**tiny, vocab_size=len(tokenizer), num_key_value_heads=2),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
    )
    LlavaForConditionalGeneration(config).save_pretrained(directory)
    processor.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


async def test_other_architectures_run_through_their_own_processor(tmp_path: Path) -> None:
    engine = TransformersEngine(str(save_tiny_llava(tmp_path / "tiny-llava")), max_new_tokens=8)
    await engine.start()
    rng = np.random.default_rng(11)
    decisions = await engine.decide([window(rng, [False], (80, 60)), window(rng, [True, False], (64, 64))])
    assert [d.raw.startswith((SILENCE, RESPONSE)) for d in decisions] == [True, True]
    engine.close()


def demo_config(demo_model_dir: Path, model: str, fallback: bool = True) -> VigilConfig:
    return VigilConfig(model=model, fallback_to_demo=fallback, demo_model_dir=str(demo_model_dir))


@pytest.mark.parametrize("model", ["missing-dir", "vigil-tests/no-such-model"])
async def test_an_unloadable_model_falls_back_to_the_demo_model(
    demo_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: str
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = str(tmp_path / model) if model == "missing-dir" else model
    started = time.perf_counter()
    engine = load_engine(demo_config(demo_model_dir, name))
    await engine.start()
    assert time.perf_counter() - started < 15
    info = engine.info()
    assert info.demo and info.model == DEMO_MODEL_NAME and info.note == DEMO_NOTE
    rng = np.random.default_rng(3)
    [decision] = await engine.decide([window(rng, [True], (320, 240))])
    assert decision.kind == "respond"
    engine.close()


@pytest.mark.parametrize("model", ["missing-dir", "vigil-tests/no-such-model"])
async def test_without_fallback_a_missing_model_fails_fast_saying_what_was_tried(
    demo_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: str
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = str(tmp_path / model) if model == "missing-dir" else model
    engine = load_engine(demo_config(demo_model_dir, name, fallback=False))
    started = time.perf_counter()
    with pytest.raises(EngineError) as raised:
        await engine.start()
    assert time.perf_counter() - started < 15
    assert name in str(raised.value) and "VIGIL_FALLBACK_TO_DEMO" in str(raised.value)
    with pytest.raises(EngineError, match="VIGIL_FALLBACK_TO_DEMO"):
        prepare_model(demo_config(demo_model_dir, name, fallback=False))
    engine.close()


def test_prepare_model_keeps_the_config_when_the_model_is_there(tiny_random_model_dir: Path) -> None:
    config = VigilConfig(model=str(tiny_random_model_dir), fallback_to_demo=False)
    assert prepare_model(config) is config


async def test_pointing_at_the_demo_checkpoint_says_it_is_the_demo(demo_model_dir: Path) -> None:
    engine = load_engine(demo_config(demo_model_dir, str(demo_model_dir), fallback=False))
    await engine.start()
    assert engine.info().demo and engine.info().note == DEMO_NOTE
    engine.close()
