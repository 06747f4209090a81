from kimivl_cli.cli import main

main()
