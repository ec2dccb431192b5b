from steplab.cli import main

raise SystemExit(main())
