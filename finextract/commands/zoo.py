"""`finextract zoo build --out DIR [--seed N] [--trained]`: write the tiny model zoo; `zoo path`: print
the committed trained zoo's folder; `zoo second-base --out DIR`: a second trained base of its family;
`zoo heldout --out DIR`: the committed base fine-tuned on the held-out scenario's images.

Random zoo: a few seconds. Trained zoo (`--trained`, `finextract.zoo.trained`): a base and, for
the object-driven and the style-driven scenario, a DreamBooth and a LoCon LoRA fine-tune; the
stages' times are in its zoo.json (about an hour on 1 CPU thread of a busy 2-core machine). Its
output, built with FINEXTRACT_THREADS=1, is what ships in `finextract/zoo_weights/`.
"""

from __future__ import annotations

from .options import add_command


def register(subparsers) -> None:
    parser = subparsers.add_parser("zoo", help="build tiny Stable-Diffusion-format models for tests and demos")
    actions = parser.add_subparsers(dest="zoo_command", metavar="ACTION", required=True)
    build = add_command(
        actions,
        "build",
        run,
        help="write a tiny random base pipeline of every model family and its fine-tunes in every supported format "
        "(DreamBooth, LoRA x3, single files)",
    )
    build.add_argument("--out", required=True, help="folder to write (created if missing)")
    build.add_argument("--seed", type=int, default=0, help="seed of every random weight (default 0)")
    build.add_argument(
        "--families",
        default=None,
        help="the families besides SD 1.x (always written, at the top level), comma-separated: some of "
        "sd2,sd2-v,sdxl,altdiffusion and the flow-matching sd3,flux,flux-schnell, each in its own subfolder "
        "(default all but the flow ones; an empty string: SD 1.x only)",
    )
    build.add_argument(
        "--trained",
        action="store_true",
        help="train the tiny base and its DreamBooth and LoRA fine-tunes of both scenarios (about an hour on 1 thread); "
        "with --families sd3: the trained tiny flow-matching pair instead (an SD3-architecture base and its object "
        "DreamBooth and LoRA, about 30 min)",
    )
    build.add_argument(
        "--cache",
        default=None,
        help="--trained: folder keeping each trained stage (VAE, base, fine-tunes), reused when its recipe matches",
    )
    build.add_argument(
        "--scenarios",
        default="object,style",
        help="--trained: the scenarios to fine-tune, comma-separated, of object,style,heldout (default object,style; "
        "`zoo heldout` fine-tunes the held-out one on an existing base)",
    )
    heldout = add_command(
        actions,
        "heldout",
        run_heldout,
        help="fine-tune the trained zoo's base on five images no test uses, a DreamBooth and a LoRA by the committed "
        "fine-tunes' recipe (a held-out pair that scores choices made on the committed zoo; about 10 min on 1 thread)",
        description="Fine-tune the trained zoo's base on the held-out scenario's five images (a gift box, the "
        "Shepp-Logan phantom, an LFW face, a hill-shaded elevation map, the matplotlib logo: package files no test "
        "uses), a DreamBooth and a LoCon LoRA by the committed fine-tunes' recipe, into OUT/heldout/ beside a copy "
        "of base/. See docs/tiny-zoo.md.",
    )
    heldout.add_argument("--out", required=True, help="zoo folder to write: base/ (a copy) and heldout/")
    heldout.add_argument(
        "--zoo", default=None, help="trained zoo whose base is fine-tuned (default: the committed one)"
    )
    heldout.add_argument("--cache", default=None, help="folder keeping each fine-tune, reused when its recipe matches")
    add_command(actions, "path", run_path, help="print the folder of the committed trained zoo")
    second = add_command(
        actions,
        "second-base",
        run_second_base,
        help="train a second tiny base of the trained zoo's family: its VAE, tokenizer and text encoder, another "
        "UNet (a wrong-but-loadable parent for the committed fine-tunes; about 25 min on 1 thread)",
    )
    second.add_argument("--out", required=True, help="pipeline folder to write (replaced if it exists)")
    second.add_argument("--zoo", default=None, help="trained zoo lending the parts (default: the committed one)")
    second.add_argument("--seed", type=int, default=1, help="seed of the UNet and of its image subset (default 1)")
    second.add_argument(
        "--cache", default=None, help="folder keeping each trained stage, reused when its recipe matches"
    )


def run_path(args) -> int:
    from finextract.zoo.trained import default_zoo_folder

    folder = default_zoo_folder()
    if not (folder / "base" / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{folder} holds no trained zoo; build one with `finextract zoo build --trained --out DIR`"
        )
    print(folder)
    return 0


def run_second_base(args) -> int:
    from finextract.engine.config import set_threads
    from finextract.zoo.second_base import SecondBaseRecipe, build_second_base

    set_threads()
    out = build_second_base(args.out, SecondBaseRecipe(seed=args.seed), zoo=args.zoo, cache=args.cache)
    print(out)
    return 0


def run_heldout(args) -> int:
    from finextract.engine.config import set_threads
    from finextract.zoo.trained import build_heldout_zoo

    set_threads()
    print(build_heldout_zoo(args.out, args.zoo, cache=args.cache))
    return 0


def run(args) -> int:
    import logging
    import time

    from finextract.engine.config import set_threads
    from finextract.zoo.build import build_zoo

    set_threads()
    start = time.perf_counter()
    if args.trained and args.families:
        from finextract.zoo.flow_trained import FlowZooRecipe, build_flow_zoo

        if args.families != "sd3":
            raise ValueError(
                f"--trained --families {args.families}: the trained zoo has SD 1.x (no --families) and the SD3 "
                "flow pair (--families sd3)"
            )
        out = build_flow_zoo(args.out, FlowZooRecipe(seed=args.seed), cache=args.cache)
    elif args.trained:
        from finextract.zoo.trained import build_trained_zoo
        from finextract.zoo.training import TrainedZooRecipe

        out = build_trained_zoo(
            args.out, TrainedZooRecipe(seed=args.seed), cache=args.cache, scenarios=tuple(args.scenarios.split(","))
        )
    else:
        families = None if args.families is None else tuple(f for f in args.families.split(",") if f)
        out = build_zoo(args.out, seed=args.seed, families=families)
    logging.getLogger("finextract").info("zoo written to %s in %.1f s", out, time.perf_counter() - start)
    return 0
