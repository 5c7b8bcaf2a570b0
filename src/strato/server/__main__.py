from strato.server.main import main

main()
