from dynasorctl.cli import main

main()
