from snakepool.workers import main

main()
