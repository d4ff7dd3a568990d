from normfold.cli import main

main()
