from connector._entry import main

main()
