from bitdeploy.cli import main

main()
