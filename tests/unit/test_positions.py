"""Omni 3D RoPE position ids (modeling/positions.py)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omni_moe.modeling.positions import MediaSpan, build_position_ids


def test_text_only_is_arange_on_all_rows():
    ids, delta = build_position_ids(7, [], positions_per_second=25.0)
    assert ids.dtype == torch.long and ids.shape == (3, 7)
    assert torch.equal(ids, torch.arange(7).expand(3, 7))
    assert delta == 0
    empty, delta = build_position_ids(0, [], positions_per_second=25.0)
    assert empty.shape == (3, 0) and delta == 0


def test_image_spans_rows_and_columns_at_one_time():
    # 2 text, a 2x3 image, 2 text
    ids, delta = build_position_ids(10, [MediaSpan(start=2, modality="image", grid=(1, 2, 3))], 25.0)
    expected = torch.tensor(
        [
            [0, 1, 2, 2, 2, 2, 2, 2, 5, 6],
            [0, 1, 2, 2, 2, 3, 3, 3, 5, 6],
            [0, 1, 2, 3, 4, 2, 3, 4, 5, 6],
        ]
    )
    assert torch.equal(ids, expected)
    # text after the span continues at (max id in span) + 1; rope_delta = max + 1 - length
    assert delta == 7 - 10


def test_video_time_advances_with_real_time():
    # 3 frame groups, half a second apart, 4 positions per second -> t steps of 2
    span = MediaSpan(start=1, modality="video", grid=(3, 2, 2), seconds_per_t=0.5)
    ids, delta = build_position_ids(1 + 12 + 1, [span], positions_per_second=4.0)
    video = ids[:, 1:13].reshape(3, 3, 2, 2)  # (row, t, h, w)
    for i in range(3):
        assert torch.all(video[0, i] == 1 + 2 * i)
        assert torch.equal(video[1, i], torch.tensor([[1, 1], [2, 2]]))
        assert torch.equal(video[2, i], torch.tensor([[1, 2], [1, 2]]))
    assert ids[:, 13].tolist() == [6, 6, 6]  # max id 1 + 4 = 5, then + 1
    assert delta == 7 - 14


def test_audio_time_advances_with_real_time():
    # 40 ms per token at 25 positions per second -> one position per token
    ids, _ = build_position_ids(6, [MediaSpan(start=1, modality="audio", grid=(5, 1, 1), seconds_per_t=0.04)], 25.0)
    assert torch.equal(ids[:, 1:6], (1 + torch.arange(5)).expand(3, 5))
    # 200 ms per token -> 5 positions apart: time, not token count, drives t
    ids, _ = build_position_ids(4, [MediaSpan(start=0, modality="audio", grid=(3, 1, 1), seconds_per_t=0.2)], 25.0)
    assert ids[0, :3].tolist() == [0, 5, 10]
    assert ids[:, 3].tolist() == [11, 11, 11]


def test_aligned_audio_shares_time_with_video_frame_of_same_second():
    pps = 25.0
    video = MediaSpan(start=2, modality="video", grid=(3, 2, 2), seconds_per_t=1.0)  # frames at 0 s, 1 s, 2 s
    audio = MediaSpan(start=14, modality="audio", grid=(75, 1, 1), seconds_per_t=0.04, align_with_previous=True)
    length = 14 + 75 + 3
    ids, delta = build_position_ids(length, [video, audio], pps)
    frame_t = [int(ids[0, 2 + 4 * i]) for i in range(3)]
    assert frame_t == [2, 27, 52]
    for second in range(2):
        token = 14 + round(second / 0.04)
        assert int(ids[0, token]) == frame_t[second]
    # the text after the aligned span starts past everything used so far, never reusing an id
    assert int(ids[0, 89]) == int(ids[:, :89].max()) + 1
    assert delta == int(ids.max()) + 1 - length


def test_aligned_span_ending_earlier_never_moves_positions_back():
    video = MediaSpan(start=0, modality="video", grid=(4, 1, 1), seconds_per_t=1.0)  # t up to 3 s
    audio = MediaSpan(start=4, modality="audio", grid=(2, 1, 1), seconds_per_t=0.04, align_with_previous=True)
    ids, _ = build_position_ids(7, [video, audio], 25.0)
    assert ids[:, 6].tolist() == [76, 76, 76]  # video max 75, the audio's max 1 does not pull the text back


@pytest.mark.parametrize(
    "spans, message",
    [
        ([MediaSpan(2, "image", (1, 2, 2)), MediaSpan(4, "image", (1, 1, 1))], "overlap"),
        ([MediaSpan(8, "image", (1, 2, 2))], "past the sequence length"),
        ([MediaSpan(0, "audio", (3, 1, 1), 0.04, align_with_previous=True)], "first"),
        ([MediaSpan(0, "video", (2, 1, 1), seconds_per_t=0.0)], "seconds_per_t"),
        ([MediaSpan(0, "text", (1, 1, 1))], "modality"),
        ([MediaSpan(0, "image", (2, 1, 1))], "t = 1"),
    ],
)
def test_invalid_spans_are_rejected_with_a_reason(spans, message):
    with pytest.raises(ValueError, match=message):
        build_position_ids(10, spans, 25.0)


@st.composite
def sequences(draw):
    """Random text runs and media spans; an audio span may align with the media span before it."""
    spans, cursor, seen_media = [], 0, False
    for _ in range(draw(st.integers(0, 5))):
        cursor += draw(st.integers(0, 4))  # text before the span
        modality = draw(st.sampled_from(["image", "video", "audio"]))
        if modality == "image":
            grid, spt = (1, draw(st.integers(1, 4)), draw(st.integers(1, 4))), 0.0
        elif modality == "video":
            grid = (draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 3)))
            spt = draw(st.sampled_from([0.04, 0.5, 1.0, 2.0]))
        else:
            grid, spt = (draw(st.integers(1, 12)), 1, 1), draw(st.sampled_from([0.02, 0.04, 0.08, 0.5]))
        align = modality == "audio" and seen_media and draw(st.booleans())
        span = MediaSpan(cursor, modality, grid, spt, align_with_previous=align)
        spans.append(span)
        cursor += span.num_tokens
        seen_media = True
    length = cursor + draw(st.integers(0, 4))
    pps = draw(st.sampled_from([1.0, 2.0, 25.0]))
    return length, spans, pps


@settings(max_examples=150, deadline=None)
@given(sequences())
def test_property_time_ids_monotone_and_rope_delta_consistent(case):
    length, spans, pps = case
    ids, delta = build_position_ids(length, spans, pps)
    assert ids.shape == (3, length)
    is_text = torch.ones(length, dtype=torch.bool)
    for span in spans:
        is_text[span.start : span.start + span.num_tokens] = False
        t_row = ids[0, span.start : span.start + span.num_tokens]
        assert torch.all(t_row[1:] >= t_row[:-1]), "time must not go back inside a span"
    if not any(span.align_with_previous for span in spans):
        assert torch.all(ids[0, 1:] >= ids[0, :-1]), "time must not go back across spans and text"
    for i in torch.nonzero(is_text).flatten().tolist():
        assert ids[0, i] == ids[1, i] == ids[2, i], "text tokens use one id on all rows"
        if i > 0:
            assert ids[0, i] == int(ids[:, :i].max()) + 1, "text continues right after everything before it"
    expected_delta = (int(ids.max()) + 1 if length else 0) - length
    assert delta == expected_delta
    if length and is_text[-1]:
        # the next generated token (index length) lands right after the last one on all rows
        assert int(ids[0, -1]) + 1 == length + delta
