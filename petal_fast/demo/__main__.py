from petal_fast.demo import main

raise SystemExit(main())
