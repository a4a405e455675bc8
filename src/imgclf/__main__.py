import sys

try:
    from imgclf.cli import entry
except KeyboardInterrupt:  # Ctrl-C while the program itself is imported: the same one line as later
    print("imgclf: interrupted", file=sys.stderr)
    raise SystemExit(130) from None

entry()
