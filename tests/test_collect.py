"""The game collectors and the window datasets, on real procgen and ALE frames."""
import shutil

import numpy as np
import torch

from conftest import run
from dataset import FrameStore, WindowDataset, describe, split_episodes


def run_lengths(actions):
    changes = np.flatnonzero(np.diff(actions)) + 1
    return np.diff(np.concatenate([[0], changes, [len(actions)]]))


def test_coinrun_store_holds_frames_actions_episodes_levels(coinrun):
    store = FrameStore(coinrun)
    assert store.frames.shape == (600, 64, 64, 3) and store.frames.dtype == np.uint8
    assert store.frames.std() > 10  # real images, not a blank buffer
    actions = np.asarray(store.actions)
    assert actions.shape == (600,) and actions.dtype == np.int64
    assert actions.min() >= 0 and actions.max() < store.meta["num_actions"] == 15
    assert len(np.unique(actions)) >= 6, "the behaviour policy should use many actions"
    # Held actions: within each env's block, runs of one action last several steps on average.
    assert run_lengths(actions).mean() >= 3
    # Each env's block of 150 frames starts an episode, and a level is recorded per episode.
    assert {0, 150, 300, 450} <= set(store.episode_starts)
    assert len(store.levels) == len(store.episode_starts)
    assert "actions     15 kinds" in describe(store)


def test_windows_never_cross_an_episode_and_carry_aligned_actions(coinrun):
    store = FrameStore(coinrun)
    dataset = WindowDataset(store, seq_len=8, split="all")
    starts = np.array(store.episode_starts)
    for s in dataset.starts:
        assert not np.any((starts > s) & (starts < s + 8)), f"window at {s} crosses an episode start"
    item = dataset[len(dataset) // 2]
    s = dataset.starts[len(dataset) // 2]
    assert item["frames"].shape == (8, 3, 64, 64) and item["frames"].dtype == torch.uint8
    back = item["frames"].permute(0, 2, 3, 1).numpy()
    assert np.array_equal(back, store.frames[s:s + 8])
    assert torch.equal(item["actions"], torch.from_numpy(np.array(store.actions[s:s + 8])))
    # Every possible window is there: one per position with 7 frames of its episode after it.
    assert len(dataset) == sum(max(0, e - b - 7) for b, e in store.episodes())


def test_turns_reverse_the_horizontal_action_and_windows_holding_one_are_drawn_more_often(coinrun, tmp_path):
    shutil.copytree(coinrun, tmp_path / "store")
    names, second = FrameStore(coinrun).action_names, FrameStore(coinrun).episode_starts[1]
    planted = {3: "RIGHT", 5: "UP", 6: "LEFT+UP", 7: "LEFT", 9: "RIGHT+DOWN", second - 1: "LEFT",
               second: "RIGHT", second + 2: "LEFT"}  # the first horizontal action of an episode turns nothing
    actions = np.full(600, names.index("NOOP"))
    actions[list(planted)] = [names.index(n) for n in planted.values()]
    np.save(tmp_path / "store" / "actions.npy", actions)
    store = FrameStore(tmp_path / "store")
    assert np.flatnonzero(store.turns()).tolist() == [6, 9, second - 1, second + 2]

    windows = WindowDataset(store, seq_len=3, split="all")
    plain = windows.starts.copy()
    windows.oversample(store.turns(), 4)
    drawn = dict(zip(*np.unique(windows.starts, return_counts=True)))
    assert set(drawn) == set(plain)  # no new windows, so none crosses an episode
    assert sorted(s for s, n in drawn.items() if n == 4) == [5, 6, 8, 9, second + 1, second + 2]
    assert set(drawn.values()) == {1, 4} and len(windows) == len(plain) + 3 * 6


def test_held_out_split_is_by_level(coinrun):
    store = FrameStore(coinrun)
    level_of = dict(zip(store.episode_starts, store.levels))
    train = {level_of[s] for s, _ in split_episodes(store, "train", 0.5)}
    val = {level_of[s] for s, _ in split_episodes(store, "val", 0.5)}
    assert train and val and not train & val
    assert len(split_episodes(store, "train", 0.5)) + len(split_episodes(store, "val", 0.5)) == len(store.episodes())


def test_windows_load_in_dataloader_workers(coinrun):
    dataset = WindowDataset(coinrun, seq_len=4, split="all")
    loader = torch.utils.data.DataLoader(dataset, batch_size=5, shuffle=True, num_workers=2)
    batch = next(iter(loader))
    assert batch["frames"].shape == (5, 4, 3, 64, 64) and batch["actions"].shape == (5, 4)


def test_ale_breakout_collects_frames_and_actions(tmp_path):
    out = tmp_path / "breakout"
    result = run("download.py", "ale:breakout", "--frames", 400, "--num_envs", 2, "--out", out)
    assert result.returncode == 0, result.stderr
    store = FrameStore(out)
    assert store.frames.shape == (400, 210, 160, 3)
    assert store.meta["action_names"] == ["NOOP", "FIRE", "RIGHT", "LEFT"]
    assert len(np.unique(store.actions)) >= 3 and run_lengths(np.asarray(store.actions)).mean() >= 3
    assert store.frames[:, 100:].std() > 0  # the game moved


def test_frame_skip_repeats_each_action_and_keeps_one_frame_per_repeat(coinrun, tmp_path):
    """The same seed and envs as the coinrun store with --frame_skip 4: the same first frame of each env, then four
    game steps of motion between kept frames instead of one."""
    result = run("download.py", "procgen:coinrun", "--frames", 600, "--num_envs", 4, "--seed", 1, "--frame_skip", 4,
                 "--out", tmp_path / "skip")
    assert result.returncode == 0, result.stderr
    one, four = FrameStore(coinrun), FrameStore(tmp_path / "skip")
    assert four.meta["fps"] == 3.75 and four.meta["collector"]["frame_skip"] == 4
    starts = np.arange(4) * 150  # each env's block begins with its first frame
    assert np.array_equal(np.asarray(four.frames[starts]), np.asarray(one.frames[starts]))

    def motion(store):  # mean absolute change between consecutive frames of an episode
        frames, cuts = np.asarray(store.frames, np.float32), set(store.meta["episode_starts"])
        return np.mean([np.abs(frames[i + 1] - frames[i]).mean() for i in range(599) if i + 1 not in cuts])
    assert motion(four) > 1.5 * motion(one)
