from fastvlp.cli import main

raise SystemExit(main())
