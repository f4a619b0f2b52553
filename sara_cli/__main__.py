from sara_cli.cli import main

main()
