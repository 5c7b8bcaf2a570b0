from strato.container.runner import main

main()
