"""The command line parses every documented command."""

from greedygrow.cli import COMMANDS, build_parser


def test_every_design_command_is_registered():
    for name in ["info", "scenes", "train-core", "grow", "sample", "evaluate", "demo"]:
        assert name in COMMANDS
    args = build_parser().parse_args(["grow", "--core", "a", "--resolution", "128", "--out", "b"])
    assert args.mode == "greedy" and args.resolution == 128
