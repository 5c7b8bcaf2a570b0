from strato.worker.agent import main

main()
