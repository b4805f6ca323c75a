from refbuild.cli import main

main()
