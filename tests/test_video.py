"""Videos: a real OpenCV-written mp4 fetched through yt-dlp with a file:// URL, then prepared into a store."""
import numpy as np

from conftest import read_video, run
from dataset import FrameStore, open_frames


def test_download_file_url_then_rerun_skips(coinrun_video, tmp_path):
    out = tmp_path / "videos"
    result = run("download.py", coinrun_video.as_uri(), "--out", out)
    assert result.returncode == 0, result.stderr
    saved = out / "clip.mp4"
    assert saved.read_bytes() == coinrun_video.read_bytes()
    mtime = saved.stat().st_mtime_ns
    again = run("download.py", coinrun_video, "--out", out)  # a plain path takes the same route
    assert again.returncode == 0, again.stderr
    assert "has already been downloaded" in again.stdout
    assert saved.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in out.iterdir()) == ["clip.mp4"]


def test_prepare_resamples_by_timestamp(coinrun_video, tmp_path):
    source = read_video(coinrun_video)  # 75 frames at 30 fps: 2.5 s
    result = run("dataset.py", "prepare", coinrun_video, "--fps", 12, "--size", "320x180", "--out", tmp_path / "s")
    assert result.returncode == 0, result.stderr
    store = FrameStore(tmp_path / "s")
    assert store.count == 30  # 2.5 s x 12 fps
    assert store.frames.shape == (30, 180, 320, 3)  # H = 180, W = 320: never swapped
    assert (store.height, store.width, store.fps) == (180, 320, 12)
    # At 10 fps, output frame k is shown at k / 10 s: exactly source frame 3k, not every k-th frame.
    result = run("dataset.py", "prepare", coinrun_video, "--fps", 10, "--out", tmp_path / "s10")
    assert result.returncode == 0, result.stderr
    store = FrameStore(tmp_path / "s10")
    assert store.count == 25
    for k in range(store.count):
        assert np.array_equal(store.frames[k], source[3 * k])


def test_prepare_upsamples_and_resizes(coinrun_video, tmp_path):
    result = run("dataset.py", "prepare", coinrun_video, "--fps", 50, "--size", "64x36", "--out", tmp_path / "s")
    assert result.returncode == 0, result.stderr
    store = FrameStore(tmp_path / "s")
    assert store.count == 125 and store.frames.shape[1:] == (36, 64, 3)


def test_training_data_from_a_video_is_prepared_once(coinrun_video, tmp_path):
    video = tmp_path / "v.mp4"
    video.write_bytes(coinrun_video.read_bytes())
    store = open_frames(video, fps=12, size=(320, 180))
    assert store.path == tmp_path / "v_12fps_320x180" and store.count == 30
    mtime = (store.path / "frames.u8").stat().st_mtime_ns
    assert open_frames(video, fps=12, size=(320, 180)).count == 30
    assert (store.path / "frames.u8").stat().st_mtime_ns == mtime  # reused, not prepared again


def test_preview_writes_playable_mp4_and_gif(coinrun, tmp_path):
    out = tmp_path / "preview.mp4"
    result = run("dataset.py", "preview", coinrun, "--frames", 20, "--scale", 2, "--out", out)
    assert result.returncode == 0, result.stderr
    frames = read_video(out)
    assert frames.shape == (20, 128, 128, 3)
    assert (tmp_path / "preview.gif").stat().st_size > 0
