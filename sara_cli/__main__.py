from sara_cli.cli.app import main

main()
