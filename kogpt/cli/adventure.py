"""`kogpt adventure`: a text adventure in the terminal — pick or write an opening, type actions at `> `,
the model continues the story sentence by sentence; /undo, /retry, /save, /load, /genre, /story, /help, /quit."""

from __future__ import annotations

import argparse
import os

from ..errors import UserError
from .common import add_model_arguments, add_sampling_arguments, check_sampling_options, load, sampling_options

NAME = "adventure"
HELP = "interactive text adventure: type actions, the model continues the story"
GOODBYE = "bye! (다음 모험에서 만나요)"
COMMANDS = (
    ("/help", "this list"),
    ("/undo", "take back the last action and its continuation (again and again)"),
    ("/retry", "a new continuation of the last action"),
    ("/save FILE", "save the story as JSON"),
    ("/load FILE", "continue a saved story"),
    ("/genre NAME|off", "steer the story toward a topic (fantasy, horror, mystery, space, ...) or stop steering"),
    ("/story", "show the whole story so far"),
    ("/quit", "leave (Ctrl-D and Ctrl-C too)"),
)
QUIT = object()


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, decodes=True)
    g = p.add_argument_group("story")
    g.add_argument("--opening", help="the story's opening text (skips the menu of openings)")
    g.add_argument("--load", metavar="FILE", help="continue a story saved with /save")
    g.add_argument("--genre", help="steer the story toward a topic with PPLM bag-of-words: a bundled topic "
                                   "(fantasy 판타지, horror 공포, mystery 추리, space 우주, ...) or a word-list file")
    add_sampling_arguments(p)
    p.epilog = ("The story is sampled with temperature 0.8, top-p 0.9, repetition penalty 1.2, no-repeat-ngram 3 "
                "and 80 new tokens a turn unless the decoding flags say otherwise; --seed replays a session.")


def run(args: argparse.Namespace) -> int:
    from ..apps.adventure import DEFAULT_OPTIONS, Adventure, Story, load_story

    check_sampling_options(args)  # bad options fail before the model loads
    if args.max_length is not None:
        raise UserError("--max-length does not fit a growing story; use --max-new-tokens (default "
                        f"{DEFAULT_OPTIONS['max_new_tokens']})")
    if args.opening is not None and not args.opening.strip():
        raise UserError("--opening is empty; give the story a first sentence")
    if args.load and args.opening is not None:
        raise UserError("pass --opening or --load, not both")
    if args.load:
        load_story(args.load)  # a bad save file fails before the model loads
    if args.genre:
        from ..generation.steering import read_words

        read_words(args.genre)  # an unknown topic or missing file too
    gpt = load(args)
    game = Adventure(gpt, Story(""), sampling_options(args), seed=args.seed, genre=args.genre, stop=tuple(args.stop))
    if game.options["max_new_tokens"] >= gpt.model.config.n_positions:
        raise UserError(f"--max-new-tokens {game.options['max_new_tokens']} leaves no room for the story in the "
                        f"model's window of {gpt.model.config.n_positions} tokens")
    try:
        if args.load:
            d = game.load(args.load)
            game.genre = args.genre or game.genre  # --genre wins over the save's
            _loaded(game, args.load, d)
        else:
            game.story = Story(args.opening.strip() if args.opening else choose_opening())
            print(f"\n{game.story.opening}\n", flush=True)
        print("(type what you do, e.g. 문을 연다 — /help lists the commands)\n", flush=True)
        while True:
            line = input("> ").strip()
            if not line:
                continue
            if line.startswith("/"):
                if command(game, line) is QUIT:
                    break
                continue
            show(game.play(line))
    except (EOFError, KeyboardInterrupt):
        print()
    print(GOODBYE, flush=True)
    return 0


def choose_opening() -> str:
    """Ask for a bundled opening by number, or an opening of the player's own."""
    from ..apps.adventure import OPENINGS

    print("choose an opening (이야기를 고르세요):")
    for i, (title, _) in enumerate(OPENINGS, 1):
        print(f"  {i}. {title}")
    print("  or write your own first sentence (직접 쓰기)", flush=True)
    while True:
        answer = input("opening> ").strip()
        if answer.isdigit():
            if 1 <= int(answer) <= len(OPENINGS):
                return OPENINGS[int(answer) - 1][1]
            print(f"  choose 1 to {len(OPENINGS)}, or write your own opening", flush=True)
        elif answer:
            return answer


def show(pieces) -> None:
    """Print a continuation as it comes; a UserError is one line and the story stays as it was."""
    shown = False
    try:
        for piece in pieces:
            print(piece, end="", flush=True)
            shown = True
    except UserError as e:
        if shown:
            print()
        print(f"  {e}", flush=True)
        return
    print("\n" if shown else "  (nothing came — /retry for another continuation, or try another action)\n",
          flush=True)


def command(game, line: str):
    """Run one /command; QUIT ends the game."""
    name, _, arg = line.partition(" ")
    name, arg = name.lower(), arg.strip()
    if name in ("/quit", "/exit", "/q"):
        return QUIT
    if name in ("/help", "/?"):
        width = max(len(c) for c, _ in COMMANDS)
        print("\n".join(f"  {c:<{width}}  {what}" for c, what in COMMANDS), flush=True)
    elif name == "/undo":
        turn = game.undo()
        print(f"  undone: > {turn.action}" if turn else "  nothing to undo: only the opening is left", flush=True)
    elif name == "/retry":
        show(game.retry())
    elif name in ("/save", "/load"):
        if not arg:
            print(f"  usage: {name} FILE", flush=True)
        elif name == "/save":
            _save(game, os.path.expanduser(arg))
        else:
            _load(game, os.path.expanduser(arg))
    elif name == "/genre":
        if arg.lower() in ("off", "none"):
            game.genre = None
        elif arg:
            from ..generation.steering import read_words

            try:
                read_words(arg)
                game.genre = arg
            except UserError as e:
                print(f"  {e}", flush=True)
        print(f"  genre: {game.genre or 'off'}", flush=True)
    elif name == "/story":
        print(f"\n{game.story.text()}\n", flush=True)
    else:
        print(f"  unknown command {name}; commands: {' '.join(c.split()[0] for c, _ in COMMANDS)}", flush=True)
    return None


def _save(game, path: str) -> None:
    try:
        game.save(path)
    except OSError as e:
        print(f"  cannot save {path}: {e.strerror or e}", flush=True)
        return
    print(f"  saved to {path} ({_turns(game)})", flush=True)


def _load(game, path: str) -> None:
    try:
        d = game.load(path)
    except (UserError, OSError) as e:  # missing, malformed, unreadable: one line, the story goes on
        print(f"  cannot load: {e.strerror + ': ' + path if isinstance(e, OSError) and e.strerror else e}",
              flush=True)
        return
    _loaded(game, path, d)


def _loaded(game, path: str, d: dict) -> None:
    """Say what was loaded and show where the story stands."""
    from ..apps.adventure import turn_text

    other = f", saved with model {d['model']}" if d.get("model") and d["model"] != game.gpt.name else ""
    if d.get("dropped_genre"):
        other += f"; its genre {d['dropped_genre']!r} is not a bundled topic, so steering is off"
    print(f"  loaded {path} ({_turns(game)}, genre {game.genre or 'off'}{other})", flush=True)
    last = turn_text(game.story.turns[-1]) if game.story.turns else game.story.opening
    print(f"\n{'…' if game.story.turns else ''}{last}\n", flush=True)


def _turns(game) -> str:
    n = len(game.story.turns)
    return f"{n} turn{'' if n == 1 else 's'}"
