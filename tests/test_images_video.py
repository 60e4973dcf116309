"""SigLIP image preprocessing ("pad" mode) and 1-FPS video sampling, on files made here."""

from __future__ import annotations

import av
import numpy as np
import pytest
from PIL import Image

from gazejax.data import video
from gazejax.data.images import load_image, preprocess, read_image
from gazejax.data.records import DataError
from gazejax.data.video import read_video, sample_times, uniform_indices

STEP = 6  # frame i of a test clip is uniformly grey with level STEP * i


def write_clip(path, num_frames: int, rate: int, size: int = 32, fmt: str | None = None) -> None:
    """An MPEG-4 clip at ``rate`` fps whose frame ``i`` is uniformly grey ``STEP * i``."""
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(num_frames):
            pixels = np.full((size, size, 3), STEP * i, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())


def frame_ids(frames: np.ndarray) -> list[int]:
    """Which clip frame each preprocessed frame ``[T, H, W, 3]`` is, from its grey level."""
    return [round(v) for v in ((frames.mean(axis=(1, 2, 3)) * 0.5 + 0.5) * 255 / STEP)]


# --- Images ------------------------------------------------------------------------------------


def test_a_uniform_image_stays_uniform_at_its_normalised_value():
    out = preprocess(Image.new("RGB", (50, 30), (200, 10, 127)), 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.float32
    expected = (np.array([200, 10, 127]) / 255 - 0.5) / 0.5
    np.testing.assert_allclose(out[8, 8], expected, atol=1e-6)  # centre: the image
    np.testing.assert_allclose(out[0, 0], (127 / 255 - 0.5) / 0.5, atol=1e-6)  # pad colour
    square = preprocess(Image.new("RGB", (30, 30), (127, 127, 127)), 16)
    np.testing.assert_allclose(square, (127 / 255 - 0.5) / 0.5, atol=1e-6)


@pytest.mark.parametrize("size", [(40, 24), (24, 40), (33, 33)])
def test_preprocess_is_numpy_padding_then_bicubic_resize_then_scaling(size):
    width, height = size
    rgb = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    side = max(width, height)
    padded = np.full((side, side, 3), 127, np.uint8)  # mean colour int(0.5 * 255)
    top, left = (side - height) // 2, (side - width) // 2
    padded[top : top + height, left : left + width] = rgb
    resized = np.asarray(Image.fromarray(padded).resize((20, 20), Image.Resampling.BICUBIC))
    expected = resized.astype(np.float64) / 127.5 - 1.0
    out = preprocess(Image.fromarray(rgb), 20)
    assert out.shape == (20, 20, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert out.min() >= -1.0 and out.max() <= 1.0


def test_load_image_converts_to_rgb(tmp_path):
    Image.new("L", (8, 6), 90).save(tmp_path / "grey.png")
    Image.new("RGBA", (8, 6), (1, 2, 3, 0)).save(tmp_path / "alpha.png")
    Image.new("RGB", (8, 8), (250, 0, 0)).save(tmp_path / "red.jpg", quality=95)
    assert load_image(tmp_path / "grey.png").getpixel((0, 0)) == (90, 90, 90)
    assert load_image(tmp_path / "alpha.png").getpixel((0, 0)) == (1, 2, 3)
    red = read_image(tmp_path / "red.jpg", 4)
    assert red.shape == (4, 4, 3) and red[..., 0].min() > 0.9


def test_a_missing_corrupt_or_truncated_image_is_named(tmp_path):
    Image.new("RGB", (64, 64), (9, 9, 9)).save(tmp_path / "ok.jpg")
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    for name in ("missing.jpg", "cut.jpg", "junk.png"):
        with pytest.raises(DataError, match="cannot read image") as info:
            read_image(tmp_path / name, 8)
        assert info.value.path == str(tmp_path / name) and info.value.kind == "image"


# --- Frame sampling ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "duration,max_frames,fps,expected",
    [
        (3.5, 8, 1.0, [0, 1, 2, 3]),
        (3.0, 8, 1.0, [0, 1, 2]),
        (0.2, 8, 1.0, [0]),
        (0.0, 8, 1.0, [0]),
        (12.0, 3, 1.0, [0, 6, 11]),  # linspace(0, 11, 3) = 0, 5.5, 11, rounded half to even
        (2.0, 8, 2.0, [0, 0.5, 1, 1.5]),
    ],
)
def test_sample_times_are_one_per_second_then_uniform(duration, max_frames, fps, expected):
    np.testing.assert_allclose(sample_times(duration, max_frames, fps), expected)


def test_uniform_indices_keep_first_and_last_and_are_increasing():
    for count in range(1, 40):
        for max_frames in (1, 2, 5, 16):
            index = uniform_indices(count, max_frames)
            assert len(index) == min(count, max_frames) and index[0] == 0
            assert np.all(np.diff(index) > 0)
            assert max_frames == 1 or index[-1] == count - 1
    with pytest.raises(ValueError):
        uniform_indices(3, 0)
    with pytest.raises(ValueError):
        sample_times(3.0, 4, fps=0)


# --- Videos ------------------------------------------------------------------------------------


def test_a_clip_is_sampled_at_one_frame_per_second(tmp_path):
    write_clip(tmp_path / "clip.mp4", num_frames=35, rate=10)  # 3.5 s
    frames, times = read_video(tmp_path / "clip.mp4", image_size=8, max_frames=8)
    assert frames.shape == (4, 8, 8, 3) and frames.dtype == np.float32
    np.testing.assert_allclose(times, [0, 1, 2, 3], atol=1e-6)
    assert frame_ids(frames) == [0, 10, 20, 30]
    frames, times = read_video(tmp_path / "clip.mp4", image_size=8, max_frames=2)
    np.testing.assert_allclose(times, [0, 3], atol=1e-6)
    assert frame_ids(frames) == [0, 30]


@pytest.mark.parametrize("seek_gap", [video.SEEK_GAP_S, 1e9])  # seeking, or decoding through
def test_long_gaps_seek_and_land_on_the_right_frames(tmp_path, monkeypatch, seek_gap):
    monkeypatch.setattr(video, "SEEK_GAP_S", seek_gap)
    write_clip(tmp_path / "long.mkv", num_frames=40, rate=2)  # 20 s, a keyframe every 6 s
    frames, times = read_video(tmp_path / "long.mkv", image_size=8, max_frames=4)
    np.testing.assert_allclose(times, [0, 6, 13, 19], atol=1e-6)  # 0, 6.33, 12.67, 19 rounded
    assert frame_ids(frames) == [0, 12, 26, 38]


def test_a_stream_without_duration_is_measured_from_its_packets(tmp_path):
    write_clip(tmp_path / "raw.m4v", num_frames=25, rate=10, fmt="m4v")  # 2.5 s, no header
    frames, times = read_video(tmp_path / "raw.m4v", image_size=8, max_frames=8)
    np.testing.assert_allclose(times, [0, 1, 2], atol=1e-6)
    assert frame_ids(frames) == [0, 10, 20]


def test_a_clip_shorter_than_a_second_gives_one_frame(tmp_path):
    write_clip(tmp_path / "short.mp4", num_frames=3, rate=10)
    frames, times = read_video(tmp_path / "short.mp4", image_size=8, max_frames=8)
    assert frames.shape == (1, 8, 8, 3) and times.tolist() == [0.0]


def test_a_frames_folder_is_read_in_natural_order_and_subsampled(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(12):
        Image.new("RGB", (10, 10), (STEP * i,) * 3).save(folder / f"f{i}.png")
    (folder / "notes.txt").write_text("not a frame")
    frames, times = read_video(folder, image_size=8, max_frames=32)
    assert frame_ids(frames) == list(range(12)) and times.tolist() == list(range(12))
    frames, times = read_video(folder, image_size=8, max_frames=4)
    assert frame_ids(frames) == [0, 4, 7, 11] and times.tolist() == [0, 4, 7, 11]


def test_unreadable_videos_are_named(tmp_path):
    (tmp_path / "junk.mp4").write_bytes(b"\x00\x01 not a video" * 20)
    (tmp_path / "empty").mkdir()
    write_clip(tmp_path / "ok.mp4", num_frames=20, rate=10)
    data = (tmp_path / "ok.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 3])
    for name in ("missing.mp4", "junk.mp4", "empty", "cut.mp4"):
        with pytest.raises(DataError) as info:
            read_video(tmp_path / name, image_size=8, max_frames=4)
        assert info.value.path == str(tmp_path / name) and info.value.kind == "video"
    with pytest.raises(ValueError, match="max_frames") as info:  # a setup error: not DataError
        read_video(tmp_path / "ok.mp4", image_size=8, max_frames=0)
    assert not isinstance(info.value, DataError)
