from iotauth.cli import main

main()
