from khala_stream.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
