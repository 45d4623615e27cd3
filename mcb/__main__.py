from mcb.cli import main

raise SystemExit(main())
