"""Footage as it arrives: real videos that ffmpeg writes from real CoinRun frames (variable frame rate, 4:3,
letterboxed, with and without an audio track, several into one store, a playlist through yt-dlp), and bad ones."""
import json
import subprocess

import cv2
import numpy as np
import pytest

from bench import encode_video
from conftest import assert_user_error, run
from dataset import FrameStore, WindowDataset, ffmpeg_exe, open_frames, split_episodes


def stamp(frames):
    """Each frame's index written into its top-left corner as 8 black or white 16x16 blocks, which survive H.264."""
    frames = frames.copy()
    for index, frame in enumerate(frames):
        for bit in range(8):
            frame[:16, 16 * bit:16 * bit + 16] = 255 if index >> bit & 1 else 0
    return frames


def read_stamp(frame):
    return sum(1 << bit for bit in range(8) if frame[4:12, 16 * bit + 4:16 * bit + 12].mean() > 128)


def reference_indices(video, fps):
    """The source frame each output frame showed in prepare's OpenCV implementation (replaced by ffmpeg, kept here as
    the reference for what prepare means): output frame k is the source frame whose container timestamp is nearest
    to k / fps, the first frame at 0 and the last lasting one nominal frame."""
    capture = cv2.VideoCapture(str(video))
    source_fps, times = capture.get(cv2.CAP_PROP_FPS), []
    while capture.read()[0]:
        time = capture.get(cv2.CAP_PROP_POS_MSEC) / 1000
        if times and not time > times[-1]:
            time = times[-1] + 1 / source_fps
        times.append(time if times else 0.0)
    ends = [(a + b) / 2 for a, b in zip(times, times[1:])] + [times[-1] + 1 / source_fps]
    indices = []
    for index, end in enumerate(ends):
        while len(indices) / fps < end:
            indices.append(index)
    return indices


def psnr(a, b):
    return 10 * np.log10(255 ** 2 / np.mean((a.astype(np.float64) - b) ** 2))


def leftovers(folder):
    return [p.name for p in folder.iterdir() if ".tmp" in p.name or ".old-" in p.name]


@pytest.mark.parametrize("fps", [12, 10, 25])
def test_variable_frame_rate_matches_the_reference(wide_frames, tmp_path, fps):
    # jittered timing, then a 0.2 s gap from frame 40 on: frames are both dropped and repeated
    video = tmp_path / "vfr.mp4"
    encode_video(video, stamp(wide_frames), (320, 180), 30, times="(N + 0.4 * sin(1.3 * N) + 6 * gte(N, 40)) / 30")
    expected = reference_indices(video, fps)
    assert len(set(expected)) < len(expected) or fps < 30  # the reference itself is no identity
    result = run("dataset.py", "prepare", video, "--fps", fps, "--out", tmp_path / "s")
    assert result.returncode == 0, result.stderr
    store = FrameStore(tmp_path / "s")
    assert [read_stamp(frame) for frame in store.frames] == expected


def four_by_three(wide_frames):
    """320x240 frames with picture to every edge: a CoinRun frame over the top of the next one."""
    return np.concatenate([wide_frames[:10], wide_frames[10:20, :60]], axis=1)


@pytest.mark.parametrize("fit", ["crop", "pad", "stretch"])
def test_fit_a_four_by_three_source_into_sixteen_by_nine(wide_frames, tmp_path, fit):
    source = four_by_three(wide_frames)
    video = tmp_path / "4x3.mp4"
    encode_video(video, source, (320, 240), 10)
    result = run("dataset.py", "prepare", video, "--fps", 10, "--size", "160x90", "--fit", fit, "--out", tmp_path / "s")
    assert result.returncode == 0, result.stderr
    frames = np.array(FrameStore(tmp_path / "s").frames)
    assert frames.shape == (10, 90, 160, 3)

    def resize(images, width, height):
        return np.stack([cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA) for image in images])
    padded = np.zeros_like(frames)
    padded[:, :, 20:140] = resize(source, 120, 90)
    expected = {"crop": resize(source[:, 30:210], 160, 90), "pad": padded, "stretch": resize(source, 160, 90)}
    scores = {name: psnr(frames, image) for name, image in expected.items()}
    assert scores[fit] > 30 and all(scores[fit] > score + 5 for name, score in scores.items() if name != fit), scores
    if fit == "pad":
        assert frames[:, :, :19].max() < 20 and frames[:, :, 141:].max() < 20  # black bars, left and right
    assert json.loads((tmp_path / "s" / "meta.json").read_text())["fit"] == fit


def test_crop_auto_removes_letterbox_and_pillarbox_bars(wide_frames, tmp_path):
    boxed = np.zeros((10, 300, 400, 3), np.uint8)
    boxed[:, 60:240, 40:360] = wide_frames[:10]  # a 16:9 picture inside bars on all four sides
    video = tmp_path / "boxed.mp4"
    encode_video(video, boxed, (400, 300), 10, audio=True)
    result = run("dataset.py", "prepare", video, "--fps", 10, "--crop", "auto", "--out", tmp_path / "s")
    assert result.returncode == 0, result.stderr
    assert "bars cropped to 320x180 at 40,60" in result.stdout
    frames = np.array(FrameStore(tmp_path / "s").frames)
    assert psnr(frames, wide_frames[:10]) > 30
    for border in frames[:, 0], frames[:, -1], frames[:, :, 0], frames[:, :, -1]:
        assert border.mean() > 30  # picture, not bar
    result = run("dataset.py", "prepare", video, "--fps", 10, "--out", tmp_path / "plain")
    assert result.returncode == 0, result.stderr
    assert np.array(FrameStore(tmp_path / "plain").frames)[:, :, :5].max() < 20  # without it the bars stay


def test_several_videos_make_one_store_of_episodes(wide_frames, tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    encode_video(folder / "a.mp4", wide_frames[:40], (320, 180), 20, audio=True)
    encode_video(folder / "b.mp4", wide_frames[40:], (320, 180), 20)
    result = run("dataset.py", "prepare", folder / "a.mp4", folder / "b.mp4", "--fps", 10, "--out", tmp_path / "s")
    assert result.returncode == 0, result.stderr
    store = FrameStore(tmp_path / "s")
    assert store.count == 20 + 18 and store.episodes() == [(0, 20), (20, 38)]
    assert [v["frames"] for v in store.meta["videos"]] == [20, 18]
    starts = WindowDataset(store, 8, split="all").starts
    assert len(starts) == 13 + 11 and not any(s < 20 < s + 8 for s in starts)  # no window crosses the videos
    val, train = split_episodes(store, "val"), split_episodes(store, "train")
    assert len(val) == 1 and sorted(val + train) == store.episodes()  # a whole video held out

    # a folder as a training script's DATA: prepared once beside it, again when a video is added
    store = open_frames(folder, fps=10, size=(320, 180))
    assert store.path == tmp_path / "videos_10fps_320x180" and store.count == 38
    assert open_frames(folder, fps=10, size=(320, 180)).count == 38
    encode_video(folder / "c.mp4", wide_frames[:20], (320, 180), 20)
    assert open_frames(folder, fps=10, size=(320, 180)).episodes() == [(0, 20), (20, 38), (38, 48)]


def test_a_playlist_of_file_urls_downloads_into_one_folder(wide_frames, tmp_path):
    for name, part in ("a", wide_frames[:30]), ("b", wide_frames[30:]):
        encode_video(tmp_path / f"{name}.mp4", part, (320, 180), 30)
    tracks = "".join(f"<track><location>{(tmp_path / n).as_uri()}</location><title>{n}</title></track>"
                     for n in ("a.mp4", "b.mp4"))
    playlist = tmp_path / "two_clips.xspf"
    playlist.write_text(f'<?xml version="1.0" encoding="UTF-8"?><playlist version="1" '
                        f'xmlns="http://xspf.org/ns/0/"><trackList>{tracks}</trackList></playlist>')
    result = run("download.py", playlist.as_uri(), "--out", tmp_path / "videos")
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "videos" / "two_clips"
    saved = sorted(folder.iterdir())
    assert [p.read_bytes() for p in saved] == [(tmp_path / n).read_bytes() for n in ("a.mp4", "b.mp4")]
    again = run("download.py", playlist.as_uri(), "--out", tmp_path / "videos")  # a rerun downloads nothing
    assert again.returncode == 0 and again.stdout.count("has already been downloaded") == 2, again.stdout
    result = run("dataset.py", "prepare", folder, "--fps", 10)
    assert result.returncode == 0, result.stderr
    assert FrameStore(tmp_path / "videos" / "two_clips_10fps_320x180").episodes() == [(0, 10), (10, 25)]


@pytest.mark.parametrize("size, max_height, chosen", [(None, None, "360"), ("640x360", None, "720"),
                                                      (None, 480, "480"), ("1280x720", None, "1080")])
def test_download_asks_for_the_smallest_stream_twice_the_training_rows(size, max_height, chosen):
    import yt_dlp
    from download import video_format
    heights = [144, 240, 360, 480, 720, 1080]
    info = {"id": "x", "title": "x", "extractor": "test", "extractor_key": "Test", "webpage_url": "https://x",
            "formats": [{"format_id": str(h), "url": f"https://x/{h}.mp4", "ext": "mp4", "height": h,
                         "width": h * 16 // 9, "vcodec": "avc1", "acodec": "none", "tbr": h} for h in heights]}
    spec, sort = video_format(2 * int(size.split("x")[1]) if size else 360, max_height)
    with yt_dlp.YoutubeDL({"format": spec, "format_sort": sort, "quiet": True, "simulate": True}) as ydl:
        assert ydl.process_ie_result(info, download=False)["format_id"] == chosen


@pytest.fixture
def bad_videos(wide_frames, tmp_path):
    ffmpeg = ffmpeg_exe()
    subprocess.run([ffmpeg, "-loglevel", "error", "-f", "lavfi", "-i", "sine=duration=2", "-c:a", "aac",
                    tmp_path / "audio_only.mp4"], check=True)
    subprocess.run([ffmpeg, "-loglevel", "error", "-f", "lavfi", "-i", "color=size=320x180", "-frames:v", "0",
                    "-c:v", "libx264", tmp_path / "zero_duration.mp4"], check=True)
    encode_video(tmp_path / "whole.mp4", np.concatenate([wide_frames] * 4), (320, 180), 30)  # 10 s, index first
    data = (tmp_path / "whole.mp4").read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(data[:len(data) // 2])
    (tmp_path / "empty_folder").mkdir()
    return tmp_path


@pytest.mark.parametrize("args, message", [
    (["audio_only.mp4", "--out", "store"], "holds no video stream (audio only)"),
    (["zero_duration.mp4", "--out", "store"], "holds no video stream"),
    (["truncated.mp4", "--out", "store"], "truncated.mp4 ends after"),
    (["empty_folder", "--out", "store"], "empty_folder is a folder with no video in it"),
    (["whole.mp4", "--fit", "squash", "--out", "store"], "--fit must be one of crop, pad, stretch"),
    (["whole.mp4", "--crop", "yes", "--out", "store"], "--crop must be auto"),
    (["whole.mp4", "empty_folder"], "give --out"),
])
def test_prepare_refuses_bad_videos(bad_videos, args, message):
    args = [bad_videos / a if (bad_videos / a).exists() or a == "store" else a for a in args]
    assert_user_error(run("dataset.py", "prepare", *args), message)
    assert not (bad_videos / "store").exists() and not leftovers(bad_videos)


def test_a_training_script_given_a_folder_without_videos(bad_videos):
    assert_user_error(run("train_vae.py", bad_videos / "empty_folder", "--preset", "tiny", "--steps", 1),
                      "empty_folder is a folder with no video in it")
