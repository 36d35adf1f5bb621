import sys

if sys.argv[1:] == ["--template"]:  # the fork server for preloaded pools
    from snakepool.workers._template import main as template_main

    template_main()
else:
    from snakepool.workers import main

    main()
