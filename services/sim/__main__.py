from services.sim.experiments import main

main()
