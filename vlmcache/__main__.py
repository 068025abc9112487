from vlmcache.cli import main

main()
