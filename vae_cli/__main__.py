from vae_cli.cli import main

main()
