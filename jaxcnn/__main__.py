from jaxcnn.cli import main

raise SystemExit(main())
