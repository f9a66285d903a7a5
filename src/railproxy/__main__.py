from railproxy.cli import main

main()
