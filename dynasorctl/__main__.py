from dynasorctl.cli import main

# Guarded: engine processes started by spawning re-import the main module (`serve`).
if __name__ == "__main__":
    main()
