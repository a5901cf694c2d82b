from adaptok.bench import main

main()
