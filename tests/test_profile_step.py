"""inference.profile_step: several drafters timed side by side on one target, with the evaluation's tree options."""
import pytest

from drafters.eagle import EagleModel
from inference.profile_step import main
from target.model import load_target
from tiny_assets import write_tiny_target


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("profile")
    target_dir = write_tiny_target(root / "target")
    target, _ = load_target(target_dir)
    EagleModel.from_target(target, version=3).save_pretrained(root / "eagle3" / "drafter")
    EagleModel.from_target(target, version=3, parallel_drafts=4).save_pretrained(root / "peagle")
    return target_dir, root


def test_profiles_drafters_side_by_side(saved, capsys):
    target_dir, root = saved
    main(["--target", target_dir, "--drafter", str(root / "eagle3" / "drafter"), "--drafter",
          f"parallel={root / 'peagle'}@tree_depth=4", "--tree", "chain", "--tree-depth", "3", "--steps", "2",
          "--rounds", "2"])
    out = capsys.readouterr().out
    assert "eagle3: chain tree, 4 nodes; parallel: chain tree, 5 nodes; 256-token context, 2 round(s) of 2 steps" in out
    header, rule, *rows = out.splitlines()[1:]
    assert header.split() == ["part", "(ms/step)", "plain", "share", "eagle3", "share", "parallel", "share"]
    assert [row.split()[0] for row in rows] == ["draft", "tree", "verify", "accept", "cache", "other", "step"]
    draft = [float(x) for x in rows[0].split()[1::2]]
    assert draft[0] < draft[1] and draft[0] < draft[2]  # plain decoding drafts nothing


def test_refuses_duplicate_names(saved):
    target_dir, root = saved
    with pytest.raises(ValueError, match="two methods would be named 'peagle'"):
        main(["--target", target_dir, "--drafter", str(root / "peagle"), "--drafter", str(root / "peagle")])
